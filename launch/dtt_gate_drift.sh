#!/usr/bin/env bash
# Does the compressing DTT's learned latent gate hold through the study's 3000-step final stage? (docs/study_notes.md)
# addition2, seed SEED (0): DTT's bootstrap as in the study, from the study's CoT run at step 800 (run the study's
# addition2 CoT and compressing DTT of that seed first), with one change each: the latents' gate pinned to 1
# (`model.pin_latent=True`, the previous round's recipe) or learned without the hinge inside the span
# (`bootstrap.m_in=0`: in the final stage the span holds only latents, so the cross-entropy alone sets their gate).
# The two run side by side, one per core. The table: validation accuracy and the mean span gate at the end of
# stage 3 and through the final stage (steps 3000-6000 of the 6000), beside the study's run.
#   [SEED=k] [NAMES="pinned no_span_hinge"] launch/dtt_gate_drift.sh [ROOT=runs/gate_drift[_seedk]]
# (finished runs are not rerun; NAMES: those runs only, each still on its own core)
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${SEED:-0}
root=${1:-runs/gate_drift$([ "$seed" = 0 ] || echo "_seed$seed")}
declare -A flags=([pinned]="--config.model.pin_latent=True" [no_span_hinge]="--config.bootstrap.m_in=0.0")
mkdir -p "$root"
cpu=0
for name in pinned no_span_hinge; do
  if [[ " ${NAMES:-pinned no_span_hinge} " == *" $name "* ]] && [ ! -d "$root/$name/bootstrap/checkpoints/6000" ]; then
    echo "== $root/$name"
    # shellcheck disable=SC2086
    taskset -c $((cpu % $(nproc))) python -m dtt_jax.main --config=configs/coconut.py:addition2,dtt_compress,long \
      --workdir="$root/$name" --config.seed="$seed" --config.init_from=runs/study/addition2/cot/seed"$seed" \
      --config.init_checkpoint=800 --config.coconut.start_epoch=16 --config.bootstrap.steps=6000 \
      --config.stage=bootstrap ${flags[$name]} > "$root/$name.log" 2>&1 &
  fi
  cpu=$((cpu + 1))
done
wait
python - "$root" runs/study/addition2/dtt_compress/seed"$seed" <<'EOF'
import json, os, sys
root, study = sys.argv[1:]
steps = (2900, 3000, 3500, 4000, 4500, 5000, 5500, 6000)
print('| run (addition2, bootstrap) | validation accuracy (%), mean span gate at step '
      + ' / '.join(map(str, steps)) + ' |')
print('|---|---|')
for name, out in (('the study (learned gate)', study), ('latents pinned', os.path.join(root, 'pinned')),
                  ('learned gate, no hinge in the span', os.path.join(root, 'no_span_hinge'))):
  path = os.path.join(out, 'metrics.jsonl')
  if not os.path.exists(path):
    continue
  rows = [json.loads(line) for line in open(path)]
  valid = {r['step']: (100 * r['bootstrap/valid/accuracy'], r['bootstrap/valid/gate_inner_mean'])
           for r in rows if 'bootstrap/valid/accuracy' in r}
  print(f'| {name} | ' + ' / '.join(f'{valid[s][0]:.1f}, {valid[s][1]:.2f}' if s in valid else '-' for s in steps)
        + ' |')
EOF
