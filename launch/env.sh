# Sourced by the launch scripts: `scj_venv NAME REQUIREMENTS_FILE` prints the path of a virtual environment built
# from that pinned requirements file, creating it on first use (a minute or two). Environments are cached per content
# hash of the requirements under ${SCJ_VENV_CACHE:-~/.cache/sparse_context_jax}, so a changed pin builds a new one
# and clones of the repository share them. A build interrupted half-way is discarded and redone. Packages are installed
# without pip's serial byte-compiling (--no-compile: 45 s instead of 85 s here), then byte-compiled once by
# compileall on every core (~20 s): Python cannot be trusted to cache what it imports, since PYTHONDONTWRITEBYTECODE
# (set on this project's machines) stops it writing bytecode, and every process would then compile jax, orbax and
# torch from source again (importing the package: 2.7 s instead of 1.1; a test worker's imports: 14 s instead of 6).

scj_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

scj_venv() {
  local name=$1 req=$2 root python hash cache venv
  root=$(scj_root)
  python=${PYTHON:-python3}
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $python is missing or older than Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    return 1
  fi
  hash=$( (cd "$root" && cat requirements*.txt && "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
  cache=${SCJ_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse_context_jax}
  venv=$cache/venv-$name-$hash
  mkdir -p "$cache"
  (
    flock 9
    if [ ! -f "$venv/.complete" ]; then
      echo "creating the $name environment from $req in $venv (a minute or two, once)" >&2
      rm -rf "$venv"
      if ! { "$python" -m venv "$venv" &&
             "$venv/bin/python" -m pip install --disable-pip-version-check --no-compile -r "$root/$req"; } >"$venv.log" 2>&1; then
        tail -n 20 "$venv.log" >&2
        exit 1
      fi
      touch "$venv/.complete"
    fi
    if [ ! -f "$venv/.compiled" ]; then   # also for environments built before this step existed
      # A package's non-Python files named .py (templates, Python 2 examples) fail to compile: expected, and harmless.
      "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >>"$venv.log" 2>&1 || true
      touch "$venv/.compiled"
    fi
  ) 9>"$venv.lock" || { echo "error: could not build the $name environment from $req" >&2; return 1; }
  echo "$venv"
}
