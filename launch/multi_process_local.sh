#!/usr/bin/env bash
# N processes on this machine talking through jax.distributed on localhost (CPU, gloo collectives): the
# multi-host code path without a cluster. Each process gets CPU_DEVICES_PER_PROCESS devices.
#   launch/multi_process_local.sh 2 configs/quickstart.py runs/mp [overrides...]
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES CONFIG[:stage] WORKDIR [overrides...]}
config=${2:?}
workdir=${3:?}
shift 3
port=${PORT:-$((20000 + RANDOM % 20000))}
export XLA_FLAGS="--xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS:-2}"
cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < n; i++)); do
  python -m dtt_jax.main --config="$config" --workdir="$workdir" --coordinator="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
