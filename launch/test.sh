#!/usr/bin/env bash
# The test suite: builds (once) the test environment from requirements-test.txt (runtime pins + torch, diffusers,
# pytest) and runs pytest on tests/. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv=$(scj_venv test requirements-test.txt)
cd "$(scj_root)"
# Two workers by default (the suite is CPU-bound compilation); SCJ_TEST_WORKERS=0 runs in one process.
exec "$venv/bin/python" -m pytest -n "${SCJ_TEST_WORKERS:-2}" "$@"
