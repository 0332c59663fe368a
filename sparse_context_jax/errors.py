"""Errors a user can cause with a file, shared by conversion, loading and training."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(ValueError):
  """A checkpoint does not match the expected keys, shapes or format."""


def format_keys(keys: Iterable[str], limit: int = 8) -> str:
  """The first `limit` of `keys`, sorted and comma-separated, with a count of the rest."""
  keys = sorted(keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more
