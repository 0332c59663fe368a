"""Compiled programs, cached by input signature, with an inspectable count and compile times.

`jax.jit` already caches, but silently. Shape discipline is a design goal here (one program per bucket), so
every hot function goes through a `ProgramCache` whose `count` tests assert on and whose compile times reports
print.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax


def _signature(args, static: dict) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  shapes = tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else ("py", repr(x)) for x in leaves)
  return treedef, shapes, tuple(sorted(static.items()))


class ProgramCache:
  """`cache(*args, **static)` runs `fn` through a program compiled once per (argument shapes, static values).

  Static keyword arguments must be hashable Python values (capacities, strategy names, ...).
  """

  def __init__(self, fn: Callable, name: str | None = None, donate_argnums: tuple[int, ...] = ()):
    self.fn, self.name, self.donate_argnums = fn, name or getattr(fn, "__name__", "program"), donate_argnums
    self._programs: dict = {}
    self.compile_seconds: dict = {}

  @property
  def count(self) -> int:
    return len(self._programs)

  def compiled(self, *args, **static):
    key = _signature(args, static)
    if key not in self._programs:
      t0 = time.perf_counter()
      jitted = jax.jit(lambda *a: self.fn(*a, **static), donate_argnums=self.donate_argnums)
      self._programs[key] = jitted.lower(*args).compile()
      self.compile_seconds[key] = time.perf_counter() - t0
    return self._programs[key]

  def seconds_to_compile(self, *args, **static) -> float:
    """Compile time of the program for these arguments (compiling it if needed)."""
    self.compiled(*args, **static)
    return self.compile_seconds[_signature(args, static)]

  def __call__(self, *args, **static):
    return self.compiled(*args, **static)(*args)
