#!/usr/bin/env bash
# Runs python in the pinned runtime environment (built once from requirements.txt), with this checkout's package
# importable from any folder (the environment is shared by every clone with the same pins, so the package is put on
# PYTHONPATH rather than installed into it):
#   bash launch/python.sh launch/bench_sparse.py --refs 1 2 4
#   bash /path/to/sparse_context_jax/launch/python.sh my_script.py      # a script of yours, run where you are
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv=$(scj_venv runtime requirements.txt)
export PYTHONPATH="$(scj_root)${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" "$@"
