#!/usr/bin/env bash
# Is the compressing DTT's GRPO gain RL's, or more training's? (docs/study_notes.md) On addition2, seed SEED (0), each
# method of METHODS ("dtt_compress icot coconut") trained as in the study (from the study's CoT run at step 800) with
# EXTRA more supervised steps in its final layout ("1000 3000": as many steps as the compressing DTT's GRPO stage,
# and about that stage's wall time), no GRPO, then scored on the test split at its best final-layout checkpoint (and
# the budget curve where the method has one); the table puts them beside the study's runs of the same seed.
#   [SEED=k] [METHODS="..."] [EXTRA="..."] launch/dtt_compress_controls.sh [ROOT=runs/compress_controls[_seedk]]
# (finished runs are not rerun)
# Its table in docs/study_notes.md was made at commit a519e2b, when the study's final stage had 150 steps and the
# compressing DTT pinned its latents' gate; `git checkout a519e2b` reruns it as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${SEED:-0}
root=${1:-runs/compress_controls$([ "$seed" = 0 ] || echo "_seed$seed")}
for method in ${METHODS:-dtt_compress icot coconut}; do
  for extra in ${EXTRA:-1000 3000}; do
    out=$root/${method}_sft$extra
    common=(--config=configs/coconut.py:addition2,$method,long --workdir="$out" --config.seed=$seed
            --config.init_from=runs/study/addition2/cot/seed$seed --config.init_checkpoint=800
            --config.coconut.start_epoch=16 --config.eval.split=test)
    if [ -f "$out/eval/test/bootstrap/metrics.json" ]; then continue; fi
    echo "== $out"
    mkdir -p "$root"
    if [ "$method" = dtt_compress ]; then  # DTT counts its bootstrap's steps; then evaluation alone (no GRPO)
      for stage in bootstrap eval; do
        python -m dtt_jax.main "${common[@]}" --config.bootstrap.steps=$((3150 + extra)) --config.stage=$stage \
          >> "$out.log" 2>&1
      done
    else  # the COCONUT family's schedule: 79 epochs of 50 steps (16 of them the CoT run's)
      python -m dtt_jax.main "${common[@]}" --config.coconut.num_epochs=$((79 + extra / 50)) >> "$out.log" 2>&1
    fi
    if [ "$method" != icot ]; then
      python -m dtt_jax.eval.budget --workdir="$out" --budgets=0,1,2,3,4 >> "$out.log" 2>&1
    fi
  done
done
python - "$root" "$seed" <<'EOF'
import glob, json, os, sys
root, seed = sys.argv[1:]
print(f'| run (addition2, seed {seed}) | test accuracy (%) | at 0 latents / thoughts | # tokens |')
print('|---|---|---|---|')
rows = [(os.path.basename(p), p, 'bootstrap') for p in sorted(glob.glob(os.path.join(root, '*_sft*')), key=len)]
for method in ('dtt_compress', 'icot', 'coconut'):
  study = f'runs/study/addition2/{method}/seed{seed}'
  rows += [(f'study: {method}', study, 'bootstrap')] + ([(f'study: {method} + 1000 GRPO steps', study, 'grpo')]
                                                        if method == 'dtt_compress' else [])
for name, out, stage in rows:
  path = os.path.join(out, 'eval', 'test', stage, 'metrics.json')
  if not os.path.exists(path):
    continue
  m = json.load(open(path))
  zero = os.path.join(out, 'eval', 'test@budget0', stage, 'metrics.json')  # the scored stage's curve only
  zero = f"{100 * json.load(open(zero))['accuracy']:.1f}" if os.path.exists(zero) else '-'
  tokens = m.get('completion_tokens', m.get('generated_tokens'))
  print(f"| {name} | {100 * m['accuracy']:.1f} | {zero} | {tokens:.1f} |")
EOF
