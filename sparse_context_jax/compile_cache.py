"""jax's persistent compilation cache: a program compiled once is read back from disk by every later process
(a resumed run, the next `generate`, a benchmark rerun) instead of being compiled again.

The folder is `$SCJ_COMPILE_CACHE`, else `$XDG_CACHE_HOME/sparse_context_jax/xla` (default `~/.cache/...`);
`SCJ_COMPILE_CACHE=off` disables it. Entries are keyed by the program, the jax/XLA version and the devices, so
one folder serves every config and machine type; deleting it is always safe.
"""

from __future__ import annotations

import os

ENV = "SCJ_COMPILE_CACHE"


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sparse_context_jax", "xla")


def enable(directory: str | None = None, min_compile_seconds: float = 0.5) -> str | None:
  """Turns the cache on (before the first compile); returns its folder, or None when `SCJ_COMPILE_CACHE=off`.

  Programs that compiled in under `min_compile_seconds` are not written (reading them back would cost more).
  """
  import jax
  directory = directory or os.environ.get(ENV) or default_dir()
  if directory.lower() in ("off", "none", "0"):
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
