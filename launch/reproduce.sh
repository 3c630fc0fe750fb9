#!/usr/bin/env bash
# The COCONUT Table-1 study (issue #9): every method on ProntoQA and ProsQA with the same model, data and budget
# (configs/coconut.py), the addition curriculum of seed 002, then the markdown table.
#   launch/reproduce.sh [OUT=runs/study] [--config.x=y ...]      (overrides apply to every run)
# DATASETS / METHODS select a subset. Rerunning resumes: finished runs only re-evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/study}
shift || true
datasets=${DATASETS:-prontoqa prosqa}
methods=${METHODS:-no_cot cot pause pause_as_thought coconut_no_curriculum coconut dtt}
for dataset in $datasets; do
  for method in $methods; do
    echo "== $dataset $method"
    python -m dtt_jax.main --config="configs/coconut.py:$dataset,$method" --workdir="$out/${dataset}_$method" "$@"
  done
done
echo "== addition coconut (curriculum, validation at every stage)"
python -m dtt_jax.main --config=configs/coconut.py:addition,coconut --workdir="$out/addition_coconut" "$@"
python -m dtt_jax.eval.study --root="$out" --output="$out/study.md" --command="launch/reproduce.sh $out $*"
