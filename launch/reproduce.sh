#!/usr/bin/env bash
# The method study of docs/study.md (issues #18, #28, #29): every method x task x seed at the long budget, two runs
# at a time, each pinned to one core, then the report (docs/study.md, its plots and the ledger docs/study_runs.json).
#   launch/reproduce.sh [--tasks=addition2] [--methods=cot,coconut] [--seeds=0] [--config.x=y ...]
# Rerunning resumes: finished runs are not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m dtt_jax.eval.study --jobs=2 "$@"
