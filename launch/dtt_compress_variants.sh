#!/usr/bin/env bash
# What keeps the compressing DTT from learning addition3 where COCONUT does? (docs/study_notes.md)
# TASK (addition3), seed SEED (0): the study's compressing DTT run (bootstrap, GRPO, test, budget curve; run the
# study's TASK CoT, COCONUT and compressing DTT of that seed first), beside the same run with one change each:
#   before_final: the hinge pushes the latents' gate towards 1 before the final stage only
#                 (`coconut.latent_hinge=before_final`: in the final stage the cross-entropy alone sets it);
#   pinned:       the latents' gate pinned to 1 (`model.pin_latent=True`: COCONUT's continuous thoughts);
#   pin_text:     pinned, and every other gate pinned to 0 (`model.pin_text=True`: COCONUT's inputs exactly;
#                 what is left of DTT is its layout, the kept steps inside the span, and the jittered counts).
# Each runs as the study runs it (`python -m dtt_jax.eval.study`, its own root and ledger under ROOT/<name>, the
# study's CoT run linked in), one per core from core FIRST_CPU (0). The table: validation accuracy and mean latent
# gate at the end of each latent stage and every 1000 steps of the final stage, the test accuracy of the bootstrap's
# scored checkpoint and after GRPO, and the budget curve.
#   [TASK=addition3] [SEED=k] [NAMES="before_final pinned pin_text"] [FIRST_CPU=0] launch/dtt_compress_variants.sh [ROOT]
# (finished runs are not rerun)
set -euo pipefail
cd "$(dirname "$0")/.."
task=${TASK:-addition3}
seed=${SEED:-0}
root=${1:-runs/compress_variants}
declare -A flags=([before_final]="--config.coconut.latent_hinge=before_final" [pinned]="--config.model.pin_latent=True"
                  [pin_text]="--config.model.pin_latent=True --config.model.pin_text=True")
cpu=${FIRST_CPU:-0}
for name in ${NAMES:-before_final pinned pin_text}; do
  out="$root/$name"
  mkdir -p "$out/$task/cot"
  ln -sfn "$(realpath "runs/study/$task/cot/seed$seed")" "$out/$task/cot/seed$seed"
  echo "== $out (core $((cpu % $(nproc))))"
  # shellcheck disable=SC2086
  taskset -c $((cpu % $(nproc))) python -m dtt_jax.eval.study --tasks="$task" --methods=dtt_compress --seeds="$seed" \
    --root="$out" --output="$out/study.md" --notes=none ${flags[$name]} > "$out.log" 2>&1 &
  cpu=$((cpu + 1))
done
wait
python - "$task" "$seed" "$root" <<'EOF2'
import json, os, sys
from configs import coconut as configs
from dtt_jax.eval import budget, heldout
task, seed, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
k = configs.get_config(f'{task},dtt_compress,long').coconut
stage = k.epochs_per_stage * k.steps_per_epoch  # steps of a latent stage
final = k.max_stage * stage  # bootstrap step where the final stage starts
steps = list(range(stage, final + configs.FINAL_STAGES * stage + 1, stage))
print(f'| {task} seed {seed} | validation accuracy (%), mean latent gate at bootstrap step '
      + ' / '.join(map(str, steps)) + f' (the ends of stages 1-{k.max_stage}, then the final stage) | '
      'test: bootstrap / GRPO (%) (scored step), tokens | budget curve of the scored run (latents: test %) |')
print('|---|---|---|---|')
runs = [('the study (hinge always, gate learned)', f'runs/study/{task}/dtt_compress/seed{seed}')]
runs += [(name, f'{root}/{name}/{task}/dtt_compress/seed{seed}') for name in ('before_final', 'pinned', 'pin_text')]
runs += [("the study's COCONUT (no GRPO)", f'runs/study/{task}/coconut/seed{seed}')]
for name, out in runs:
  path = os.path.join(out, 'metrics.jsonl')
  if not os.path.exists(path):
    continue
  rows = [json.loads(line) for line in open(path)]
  valid = {r['step']: (f"{100 * r['bootstrap/valid/accuracy']:.1f}",
                       f"{r['bootstrap/valid/gate_inner_mean']:.2f}" if 'bootstrap/valid/gate_inner_mean' in r else '-')
           for r in rows if 'bootstrap/valid/accuracy' in r}
  test = {}  # stage -> its test report
  for stage in ('bootstrap', 'grpo'):
    p = os.path.join(heldout.output_dir(out, 'test', stage), 'metrics.json')
    if os.path.exists(p):
      test[stage] = json.load(open(p))
  scored = 'grpo' if 'grpo' in test else 'bootstrap'  # the run's last evaluated stage
  m = test.get(scored)
  tokens = f'{m.get("generated_tokens", m.get("completion_tokens")):.1f}' if m else '-'  # as the study reads them
  curve = []
  for b in range(k.max_stage * k.c_thoughts + 2):
    p = budget.metrics_path(out, 'test', scored, 'best', b)
    if os.path.exists(p):
      curve.append(f'{b}: {100 * json.load(open(p))["accuracy"]:.1f}')
  print(f'| {name} | ' + ' / '.join(', '.join(valid[s]) if s in valid else '-' for s in steps)
        + ' | ' + ' / '.join(f'{100 * test[s]["accuracy"]:.1f} (step {test[s]["step"]})' if s in test else '-'
                             for s in ('bootstrap', 'grpo'))
        + f', {tokens} | {", ".join(curve) or "-"} |')
EOF2
