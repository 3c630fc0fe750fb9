#!/usr/bin/env bash
# The diagnostic runs behind the study's DTT recipes (docs/study_notes.md, "Why these recipes"): addition2, seed 0,
# DTT's bootstrap from the study's CoT run at step 800 (run `python -m dtt_jax.eval.study --tasks=addition2
# --methods=cot --seeds=0` first), the study's recipe with one setting changed per run, then a table of the
# validation accuracy at the end of each stage (1000, 2000, 3000: stages 1-3; 3150: the final stage).
#   launch/dtt_diagnostics.sh [ROOT=runs/diagnostics]       (a finished run is not run again)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs/diagnostics}
cot=runs/study/addition2/cot/seed0
mkdir -p "$root"
common=(--config.seed=0 --config.init_from="$cot" --config.init_checkpoint=800 --config.bootstrap.steps=3150
        --config.stage=bootstrap)
declare -A runs=(
  [seed]="dtt"
  [seed_dropout]="dtt --config.model.dropout=0.1"
  [seed_unclipped]="dtt --config.bootstrap.grad_clip=0"
  [compress]="dtt_compress --config.coconut.start_epoch=16"
  [compress_unclipped]="dtt_compress --config.coconut.start_epoch=16 --config.bootstrap.grad_clip=0"
  [compress_emitted]="dtt_compress --config.coconut.start_epoch=16 --config.coconut.latent_targets=True"
  [compress_learned_gate]="dtt_compress --config.coconut.start_epoch=16 --config.coconut.latent_targets=True
                           --config.model.pin_latent=False"
)
for name in seed seed_dropout seed_unclipped compress compress_unclipped compress_emitted compress_learned_gate; do
  read -r method flags <<< "$(echo ${runs[$name]})"
  if [ ! -d "$root/$name/bootstrap/checkpoints/3150" ]; then
    echo "== $name"
    # shellcheck disable=SC2086
    python -m dtt_jax.main --config="configs/coconut.py:addition2,$method,long" --workdir="$root/$name" \
      "${common[@]}" $flags > "$root.$name.log" 2>&1 || echo "$name failed: $root.$name.log"
  fi
done
python - "$root" <<'EOF'
import json, os, sys
root = sys.argv[1]
print('| run | validation accuracy (%) at step 1000 / 2000 / 3000 / 3150 | best | reasoning tokens at 3150 |')
print('|---|---|---|---|')
for name in sorted(os.listdir(root)):
  path = os.path.join(root, name, 'metrics.jsonl')
  if not os.path.exists(path):
    continue
  valid = {}
  for line in open(path):
    r = json.loads(line)
    if 'bootstrap/valid/accuracy' in r:
      valid[r['step']] = (r['bootstrap/valid/accuracy'], r['bootstrap/valid/reasoning_tokens'])
  at = ' / '.join(f'{100 * valid[s][0]:.1f}' if s in valid else '-' for s in (1000, 2000, 3000, 3150))
  best = max(v[0] for v in valid.values()) if valid else 0
  print(f'| {name} | {at} | {100 * best:.1f} | {valid.get(3150, (0, 0))[1]:.1f} |')
EOF
