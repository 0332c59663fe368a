"""Compiled programs, cached by input signature, with an inspectable count and compile times.

`jax.jit` already caches, but silently. Shape discipline is a design goal here (one program per bucket), so
every hot function goes through a `ProgramCache` whose `count` tests assert on and whose compile times reports
print. `ModuleProgram` is the one place a Flax module is split into a graph definition and a state for jit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
from flax import nnx


def signature(args, static: dict) -> tuple:
  """What a program is compiled for: the argument tree, every leaf's shape and dtype, and the static values."""
  leaves, treedef = jax.tree.flatten(args)
  shapes = tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else ("py", repr(x)) for x in leaves)
  return treedef, shapes, tuple(sorted(static.items()))


class ProgramCache:
  """`cache(*args, **static)` runs `fn` through a program compiled once per (argument shapes, static values).

  Static keyword arguments must be hashable Python values (capacities, strategy names, ...). `shardings`, when
  given, maps the arguments of a new signature to jit's `(in_shardings, out_shardings)`.
  """

  def __init__(self, fn: Callable, name: str | None = None, donate_argnums: tuple[int, ...] = (),
               shardings: Callable | None = None):
    self.fn, self.name, self.donate_argnums = fn, name or getattr(fn, "__name__", "program"), donate_argnums
    self.shardings = shardings
    self._programs: dict = {}
    self.compile_seconds: dict = {}

  @property
  def count(self) -> int:
    return len(self._programs)

  def jit(self, *args, **static):
    """`jax.jit` of `fn` at these static values, with the shardings of these arguments (arrays or
    `jax.ShapeDtypeStruct`s): to lower for another backend, or for XLA's counts, without caching."""
    jit_kw = {}
    if self.shardings is not None:
      jit_kw["in_shardings"], jit_kw["out_shardings"] = self.shardings(*args)
    return jax.jit(lambda *a: self.fn(*a, **static), donate_argnums=self.donate_argnums, **jit_kw)

  def compiled(self, *args, **static):
    key = signature(args, static)
    if key not in self._programs:
      t0 = time.perf_counter()
      self._programs[key] = self.jit(*args, **static).lower(*args).compile()
      self.compile_seconds[key] = time.perf_counter() - t0
    return self._programs[key]

  def seconds_to_compile(self, *args, **static) -> float:
    """Compile time of the program for these arguments (compiling it if needed)."""
    self.compiled(*args, **static)
    return self.compile_seconds[signature(args, static)]

  def records(self) -> list[dict]:
    """One line per compiled program: name, signature (shortened) and compile seconds."""
    return [{"program": self.name, "signature": str(k[1])[:200], "compile_seconds": round(v, 3)}
            for k, v in self.compile_seconds.items()]

  def __call__(self, *args, **static):
    return self.compiled(*args, **static)(*args)


class ModuleProgram:
  """`fn(module, *args, **static)` compiled with the module's state as an argument, never as a constant, so new
  inputs of the same shapes never recompile and the state can be replaced (placed on a mesh, or the parameters
  of a training run: `program(*args, state=params)`)."""

  def __init__(self, module: nnx.Module, fn: Callable, name: str):
    self.graphdef, self.state = nnx.split(module)
    self.programs = ProgramCache(lambda state, *a, **static: fn(nnx.merge(self.graphdef, state), *a, **static), name)

  def __call__(self, *args, state=None, **static):
    return self.programs(self.state if state is None else state, *args, **static)

  def compiled(self, *args, state=None, **static):
    return self.programs.compiled(self.state if state is None else state, *args, **static)

  def seconds_to_compile(self, *args, state=None, **static) -> float:
    return self.programs.seconds_to_compile(self.state if state is None else state, *args, **static)
