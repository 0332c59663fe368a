#!/usr/bin/env bash
# The main job: builds (once) the runtime environment from requirements.txt and runs the demo command (which trains
# its small world model on the first run, cached under ~/.cache/sparse_context_jax, then generates with it).
# Extra arguments go to `python -m sparse_context_jax demo` (see --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv=$(scj_venv runtime requirements.txt)
cd "$(scj_root)"
exec "$venv/bin/python" -m sparse_context_jax demo "$@"
