#!/usr/bin/env bash
# A TPU pod slice: the same command on every TPU VM worker (gcloud ... ssh --worker=all), each process joining
# through jax.distributed, which detects the pod by itself (--distributed).
#
#   bash launch/train_tpu_pod.sh TPU_NAME ZONE --config configs/base.py --workdir /mnt/shared/run [--config.K=V ...]
#
# Every worker needs this repository at SCJ_REMOTE_DIR (default: ~/sparse_context_jax, e.g. a git clone of the
# same commit on each) and a --workdir all workers share (a mounted bucket or NFS: orbax writes one checkpoint from
# all of them). SCJ_DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash launch/train_tpu_pod.sh TPU_NAME ZONE TRAIN_ARGS..." >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
remote="cd ${SCJ_REMOTE_DIR:-~/sparse_context_jax} && SCJ_ACCELERATOR=tpu bash launch/train.sh --distributed"
for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
if [ -n "${SCJ_DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
