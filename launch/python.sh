#!/usr/bin/env bash
# Runs python in the pinned runtime environment (built once from requirements.txt), from the repository root:
#   bash launch/python.sh launch/bench_sparse.py --refs 1 2 4
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv=$(scj_venv runtime requirements.txt)
cd "$(scj_root)"
exec "$venv/bin/python" "$@"
