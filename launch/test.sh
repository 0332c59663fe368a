#!/usr/bin/env bash
# The test suite: builds (once) the test environment from requirements-test.txt (runtime pins + torch, diffusers,
# pytest) and runs pytest on tests/. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
venv=$(scj_venv test requirements-test.txt)
cd "$(scj_root)"
# One compilation cache for this run, shared by its workers and the commands they start (a program one test compiled
# is read back by the next: the suite takes ~20% less time) and deleted at the end, so no run sees another's
# programs. SCJ_TEST_COMPILE_CACHE=off compiles every program.
if [ "${SCJ_TEST_COMPILE_CACHE:-}" = off ]; then
  export SCJ_COMPILE_CACHE=off
else
  SCJ_COMPILE_CACHE=$(mktemp -d "${TMPDIR:-/tmp}/scj-test-xla.XXXXXX")
  export SCJ_COMPILE_CACHE
  trap 'rm -rf "$SCJ_COMPILE_CACHE"' EXIT
fi
# Two workers by default (the suite is CPU-bound compilation); SCJ_TEST_WORKERS=0 runs in one process.
"$venv/bin/python" -m pytest -n "${SCJ_TEST_WORKERS:-2}" "$@"
