"""Atomic outputs: written beside the destination under a hidden temporary name, renamed into place at the end.

After any failure nothing is left at the destination, and an existing destination is untouched; a non-empty
existing destination is refused unless `force`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
  """The destination exists and is not empty (and `force` was not given)."""


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  elif p.exists() or p.is_symlink():
    p.unlink()


def check_destination(out: str | os.PathLike, force: bool) -> Path:
  """Refuses a non-empty `out` without `force`, before any work is done."""
  out = Path(out)
  if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
    kind = "directory" if out.is_dir() else "file"
    raise OutputExistsError(f"{out} exists and is a non-empty {kind} (pass --force to replace it)")
  return out


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, force: bool, directory: bool) -> Iterator[Path]:
  """Yields a temporary path beside `out` (an empty directory if `directory`) that replaces `out` on success."""
  out = check_destination(out, force)
  out.parent.mkdir(parents=True, exist_ok=True)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = out.parent / f".{out.name}.tmp-{tag}"
  try:
    if directory:
      tmp.mkdir()
    yield tmp
    if out.exists() or out.is_symlink():
      old = out.parent / f".{out.name}.old-{tag}"
      os.rename(out, old)
      os.rename(tmp, out)
      _remove(old)
    else:
      os.rename(tmp, out)
  except BaseException:
    _remove(tmp)
    raise
