#!/usr/bin/env bash
# The diagnostic runs behind the study's DTT recipes (docs/study_notes.md, "Why these recipes"): addition2, seed 0,
# DTT's bootstrap from the study's CoT run at step 800 (run `python -m dtt_jax.eval.study --tasks=addition2
# --methods=cot --seeds=0` first), the study's recipe with one setting changed per run, then a table of the
# validation accuracy at the end of each stage (1000, 2000, 3000: stages 1-3; 3150: the final stage).
# TASK=addition3 runs the compressing DTT's diagnostics there instead (from the CoT run at step 1200, 4150 steps;
# its study runs of CoT, the seed's DTT, COCONUT and the compressing DTT first): the first recipe (kept steps in the
# span with their gate hinged to 1, `span_text=gated`), that without the latent-count jitter and started from the
# seed DTT recipe's bootstrap (a trained gate head); the kept steps fed as embeddings (`span_text=embedded`, the
# study's recipe since), that with no gate noise at tau 0.1 (every gate but the latents' ~0: COCONUT's inputs), the
# steps after `<|eot|>` (`span_text=after_eot`, COCONUT's arrangement) with and without jitter, and embedded steps
# with the latents' gate learned (`model.pin_latent=False`: each latent a continuous thought or a pause). The runs on
# addition2 were made with the first recipe and keep it (`span_text=gated`).
#   [TASK=addition3] [SEED=k] [NAMES="compress ..."] launch/dtt_diagnostics.sh [ROOT=runs/diagnostics[_addition3]]
# (finished runs are not rerun; NAMES: those runs only, the table still lists every run under ROOT)
# Its table in docs/study_notes.md was made at commit a519e2b, when the study's final stage had 150 steps and the
# compressing DTT pinned its latents' gate; `git checkout a519e2b` reruns it as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${TASK:-addition2}
if [ "$task" = addition2 ]; then text=800; steps=3150; epoch=16; else text=1200; steps=4150; epoch=24; fi
seed=${SEED:-0}
root=${1:-runs/diagnostics$([ "$task" = addition2 ] || echo "_$task")$([ "$seed" = 0 ] || echo "_seed$seed")}
cot=runs/study/$task/cot/seed$seed
mkdir -p "$root"
common=(--config.seed=$seed --config.bootstrap.steps=$steps --config.stage=bootstrap)
declare -A addition3_runs=(
  [compress]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=gated"
  [compress_no_jitter]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=gated
                        --config.coconut.latent_jitter=False"
  [compress_from_dtt]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=gated
                       --config.init_from=runs/study/$task/dtt/seed$seed --config.init_checkpoint=$steps"
  [compress_embedded]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=embedded"
  [compress_embedded_plain]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=embedded
                             --config.bootstrap.gate_noise=False --config.bootstrap.tau0=0.1"
  [compress_after_eot]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=after_eot"
  [compress_after_eot_no_jitter]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=after_eot
                                  --config.coconut.latent_jitter=False"
  [compress_learned_gate]="dtt_compress --config.coconut.start_epoch=$epoch --config.coconut.span_text=embedded
                           --config.model.pin_latent=False"
)
declare -A runs=(
  [seed]="dtt"
  [seed_dropout]="dtt --config.model.dropout=0.1"
  [seed_unclipped]="dtt --config.bootstrap.grad_clip=0"
  [compress]="dtt_compress --config.coconut.start_epoch=16 --config.coconut.span_text=gated"
  [compress_unclipped]="dtt_compress --config.coconut.start_epoch=16 --config.coconut.span_text=gated
                        --config.bootstrap.grad_clip=0"
  [compress_emitted]="dtt_compress --config.coconut.start_epoch=16 --config.coconut.span_text=gated
                      --config.coconut.latent_targets=True"
  [compress_learned_gate]="dtt_compress --config.coconut.start_epoch=16 --config.coconut.span_text=gated
                           --config.coconut.latent_targets=True
                           --config.model.pin_latent=False"
)
names=(seed seed_dropout seed_unclipped compress compress_unclipped compress_emitted compress_learned_gate)
if [ "$task" != addition2 ]; then
  names=(compress compress_no_jitter compress_from_dtt compress_embedded compress_embedded_plain compress_after_eot
         compress_after_eot_no_jitter compress_learned_gate)
  for name in "${names[@]}"; do runs[$name]=${addition3_runs[$name]}; done
fi
if [ -n "${NAMES:-}" ]; then  # NAMES="a b": those runs only
  known=" ${names[*]} "
  read -ra names <<< "$NAMES"
  for name in "${names[@]}"; do
    if [[ $known != *" $name "* ]]; then echo "NAMES: unknown run '$name' for $task; expected one of:$known" >&2; exit 2; fi
  done
fi
for name in "${names[@]}"; do
  read -r method flags <<< "$(echo ${runs[$name]})"
  start=(--config.init_from="$cot" --config.init_checkpoint=$text)  # unless the run names its own start
  if [[ $flags == *init_from* ]]; then start=(); fi
  if [ ! -d "$root/$name/bootstrap/checkpoints/$steps" ]; then
    echo "== $name"
    # shellcheck disable=SC2086
    python -m dtt_jax.main --config="configs/coconut.py:$task,$method,long" --workdir="$root/$name" \
      "${common[@]}" "${start[@]}" $flags > "$root.$name.log" 2>&1 || echo "$name failed: $root.$name.log"
  fi
done
# The table: every run under ROOT, then the study's COCONUT and compressing DTT of the same seed (their bootstrap)
python - "$root" "$steps" runs/study/$task/{coconut,dtt_compress}/seed$seed <<'EOF'
import json, os, sys
root, last, study = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ends = (*range(1000, last, 1000), last)  # the end of each stage
print(f'| run | validation accuracy (%) at step {" / ".join(map(str, ends))} | best | reasoning tokens at {last} |')
print('|---|---|---|---|')
rows = [(name, os.path.join(root, name)) for name in sorted(os.listdir(root))]
for path in study:  # runs/study/<task>/<method>/seed<k>
  rows.append(('study: ' + path.split('/')[-2], path))
for name, run in rows:
  path = os.path.join(run, 'metrics.jsonl')
  if not os.path.exists(path):
    continue
  valid = {}
  for line in open(path):
    r = json.loads(line)
    if 'bootstrap/valid/accuracy' in r:
      valid[r['step']] = (r['bootstrap/valid/accuracy'], r['bootstrap/valid/reasoning_tokens'])
  at = ' / '.join(f'{100 * valid[s][0]:.1f}' if s in valid else '-' for s in ends)
  best = max(v[0] for v in valid.values()) if valid else 0
  print(f'| {name} | {at} | {100 * best:.1f} | {valid.get(last, (0, 0))[1]:.1f} |')
EOF
