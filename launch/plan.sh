#!/usr/bin/env bash
# Pod plans from any machine: builds (once) the TPU-runtime environment (requirements-tpu.txt: the runtime pins plus
# libtpu; no TPU needed) and runs `python -m sparse_context_jax plan` with the arguments, on the CPU backend (the
# compiles target the virtual topology). libtpu's warnings go to stderr.
#   bash launch/plan.sh --config configs/base.py --topology v5p-128 --config.data.resolution=1024
#   bash launch/plan.sh --config configs/base.py --topology v5e-64 --search --plot /tmp/search.png
#   bash launch/plan.sh --generate --preset flux2-klein-9b --topology v5e-16 --resolution 1024 --refs 4
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv=$(scj_venv tpu requirements-tpu.txt)
cd "$(scj_root)"
JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} exec "$venv/bin/python" -m sparse_context_jax plan "$@"
