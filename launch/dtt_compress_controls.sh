#!/usr/bin/env bash
# Is the compressing DTT's GRPO gain RL's, or more training's? (docs/study_notes.md) On addition2, seed SEED (0): the
# study's compressing-DTT bootstrap (3150 steps from the study's CoT run at step 800) trained EXTRA more supervised
# steps in its final layout (default "1000 3000": as many steps as its GRPO stage, and about that stage's wall time)
# instead of GRPO, then scored on the test split at its best final-layout checkpoint, with its budget curve.
#   [SEED=k] [EXTRA="1000 3000"] launch/dtt_compress_controls.sh [ROOT=runs/compress_controls[_seedk]]
# (finished runs are not rerun; the table lists them beside the study's compressing DTT of the same seed)
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${SEED:-0}
root=${1:-runs/compress_controls$([ "$seed" = 0 ] || echo "_seed$seed")}
config=(--config=configs/coconut.py:addition2,dtt_compress,long --config.seed=$seed
        --config.init_from=runs/study/addition2/cot/seed$seed --config.init_checkpoint=800
        --config.coconut.start_epoch=16 --config.eval.split=test)
for extra in ${EXTRA:-1000 3000}; do
  out=$root/sft$extra
  if [ ! -f "$out/eval/test/bootstrap/metrics.json" ]; then
    echo "== $out"
    mkdir -p "$root"
    for stage in bootstrap eval; do
      python -m dtt_jax.main "${config[@]}" --workdir="$out" --config.bootstrap.steps=$((3150 + extra)) \
        --config.stage=$stage >> "$out.log" 2>&1
    done
    python -m dtt_jax.eval.budget --workdir="$out" --budgets=0,1,2,3,4 >> "$out.log" 2>&1
  fi
done
python - "$root" runs/study/addition2/dtt_compress/seed$seed <<'EOF'
import glob, json, os, sys
root, study = sys.argv[1:]
print('| run (addition2, seed %s) | test accuracy (%%) at 3 / 0 latents | # tokens |' % study[-1])
print('|---|---|---|')
rows = [(os.path.basename(p), p, 'bootstrap') for p in sorted(glob.glob(os.path.join(root, 'sft*')), key=len)]
rows += [('study: its bootstrap', study, 'bootstrap'), ('study: its bootstrap + 1000 GRPO steps', study, 'grpo')]
for name, out, stage in rows:
  path = os.path.join(out, 'eval', 'test', stage, 'metrics.json')
  if not os.path.exists(path):
    continue
  m = json.load(open(path))
  zero = os.path.join(out, 'eval', 'test@budget0', stage, 'metrics.json')  # the scored stage's curve only
  zero = f"{100 * json.load(open(zero))['accuracy']:.1f}" if os.path.exists(zero) else '-'
  print(f"| {name} | {100 * m['accuracy']:.1f} / {zero} | {m['completion_tokens']:.1f} |")
EOF
