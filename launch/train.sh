#!/usr/bin/env bash
# One training process on this host: builds (once) the environment for SCJ_ACCELERATOR (cpu: requirements.txt,
# gpu: requirements-gpu.txt, tpu: requirements-tpu.txt; default cpu) and runs `python -m sparse_context_jax train`
# with the arguments. The cluster launchers run it on every host with --distributed:
#   bash launch/train.sh --config configs/tiny.py --workdir /tmp/tiny
#   SCJ_ACCELERATOR=tpu bash launch/train.sh --distributed --config configs/base.py --workdir gs://... (one per VM)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${SCJ_ACCELERATOR:-cpu}" in
  cpu) venv=$(scj_venv runtime requirements.txt) ;;
  gpu) venv=$(scj_venv gpu requirements-gpu.txt) ;;
  tpu) venv=$(scj_venv tpu requirements-tpu.txt) ;;
  *) echo "error: SCJ_ACCELERATOR=${SCJ_ACCELERATOR} (expected cpu, gpu or tpu)" >&2; exit 2 ;;
esac
cd "$(scj_root)"
exec "$venv/bin/python" -m sparse_context_jax train "$@"
