#!/usr/bin/env bash
# One host, all of its devices (GPUs, TPU cores, or CPU devices): data parallel over a ('data',) mesh.
#   launch/single_host.sh configs/gsm8k.py runs/gsm8k [--config.bootstrap.steps=2000 ...]
# On a CPU-only machine, NUM_CPU_DEVICES=4 splits the CPU into 4 devices (for testing sharding).
set -euo pipefail
config=${1:?usage: $0 CONFIG[:stage] WORKDIR [overrides...]}
workdir=${2:?usage: $0 CONFIG[:stage] WORKDIR [overrides...]}
shift 2
if [[ -n "${NUM_CPU_DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${NUM_CPU_DEVICES} ${XLA_FLAGS:-}"
fi
cd "$(dirname "$0")/.."
exec python -m dtt_jax.main --config="$config" --workdir="$workdir" "$@"
