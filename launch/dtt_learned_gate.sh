#!/usr/bin/env bash
# The compressing DTT with its latents' gate learned instead of pinned (`model.pin_latent=False`, docs/study_notes.md)
# on addition3, seed SEED (0): its bootstrap (launch/dtt_diagnostics.sh's `compress_learned_gate` run, made first if
# missing), then the study recipe's 1000 GRPO steps, scored on the test split with its budget curve; the table puts
# it beside the study's compressing DTT of the same seed (latents pinned).
#   [SEED=k] launch/dtt_learned_gate.sh [ROOT=runs/learned_gate_addition3]
# Its table in docs/study_notes.md was made at commit a519e2b, when the study's final stage had 150 steps and the
# compressing DTT pinned its latents' gate; `git checkout a519e2b` reruns it as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${SEED:-0}
root=${1:-runs/learned_gate_addition3}
boot=runs/diagnostics_addition3$([ "$seed" = 0 ] || echo "_seed$seed")/compress_learned_gate
if [ ! -d "$boot/bootstrap/checkpoints/4150" ]; then
  TASK=addition3 SEED=$seed NAMES=compress_learned_gate launch/dtt_diagnostics.sh > /dev/null
fi
out=$root/seed$seed
if [ ! -f "$out/eval/test/grpo/metrics.json" ]; then
  echo "== $out"
  mkdir -p "$root"
  for stage in grpo eval; do
    python -m dtt_jax.main --config=configs/coconut.py:addition3,dtt_compress,long --workdir="$out" \
      --config.seed=$seed --config.model.pin_latent=False --config.init_from="$boot" --config.eval.split=test \
      --config.stage=$stage >> "$out.log" 2>&1
  done
  python -m dtt_jax.eval.budget --workdir="$out" --budgets=0,1,2,3,4,5 >> "$out.log" 2>&1
fi
python - "$root" "$boot" runs/study/addition3/dtt_compress/seed$seed <<'EOF'
import glob, json, os, sys
root, boot, study = sys.argv[1:]
print('| run (addition3) | test accuracy (%) | # tokens | latent gate mean | test accuracy (%) at 0 / 1 / ... latents |')
print('|---|---|---|---|---|')
for name, out in [(f'learned gate, {os.path.basename(p)}', p) for p in sorted(glob.glob(os.path.join(root, 'seed*')))] + \
                 [(f'study (pinned), {os.path.basename(study)}', study)]:
  path = os.path.join(out, 'eval', 'test', 'grpo', 'metrics.json')
  if not os.path.exists(path):
    continue
  m = json.load(open(path))
  curve = json.load(open(os.path.join(out, 'eval', 'test@budgets', 'budget.json')))
  at = ' / '.join(f"{100 * r['accuracy']:.1f}" for r in curve if r['budget'] >= 0)  # -1: its own length
  print(f"| {name} | {100 * m['accuracy']:.1f} | {m['completion_tokens']:.1f} | {m['gate_inner_mean']:.2f} | {at} |")
EOF
