#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed discovers the pod from the TPU environment.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/gsm8k.py gs://bucket/runs/gsm8k [overrides...]
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE CONFIG[:stage] WORKDIR [overrides...]}
zone=${2:?}
config=${3:?}
workdir=${4:?}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/dtt_jax && python -m dtt_jax.main --config=$config --workdir=$workdir --coordinator=auto $*"
