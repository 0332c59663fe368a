"""The MMDiT behind a compiled-program cache: pure function at the jit boundary, parameters passed as state."""

from __future__ import annotations

import jax
from flax import nnx

from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.programs import ModuleProgram


def flops(program) -> float:
  """XLA's FLOP count of a lowered or compiled program (`cost_analysis()`; a lowered one is compiled where the
  backend counts only compiled programs), NaN where the backend gives none.

  XLA counts the body of a loop once: for a model whose block stacks run under `lax.scan` use
  `JittedMMDiT.flops`, which counts the unrolled program."""
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  count = float((cost or {}).get("flops", float("nan")))
  if count != count and isinstance(program, jax.stages.Lowered):
    return flops(program.compile())   # some backends (GPU) count compiled programs only
  return count


class JittedMMDiT:
  """`jm(img=..., txt=..., ...)` calls the model through one compiled program per input signature.

  The parameters are an argument of the program (never closed over as constants), so new inputs of the same
  shapes never recompile; `jm.programs.count` says how many programs exist.
  """

  def __init__(self, model: MMDiT):
    self.config = model.config
    self.forward = ModuleProgram(model, lambda m, inputs: m(**inputs), "mmdit")
    self.graphdef, self.state, self.programs = self.forward.graphdef, self.forward.state, self.forward.programs
    self._unrolled = None   # the same call with unrolled block stacks, for `flops`

  @staticmethod
  def _inputs(kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}

  def __call__(self, **kw) -> jax.Array:
    return self.forward(self._inputs(kw))

  def compiled(self, **kw):
    """The compiled program for these inputs (compiling it if needed), e.g. for `flops(...)`."""
    return self.forward.compiled(self._inputs(kw))

  def flops(self, **kw) -> float:
    """XLA's FLOP count of the call for these inputs, every layer counted: the program is lowered (not compiled,
    where the backend allows) with the block stacks unrolled, since XLA counts the body of a scan once."""
    if self._unrolled is None:
      model = nnx.merge(self.graphdef, self.state)
      model.scan_layers = False
      self._unrolled = ModuleProgram(model, lambda m, inputs: m(**inputs), "mmdit_unrolled")
    inputs = self._inputs(kw)
    return flops(self._unrolled.programs.jit(self.state, inputs).lower(self.state, inputs))

  def compile_seconds(self, **kw) -> float:
    return self.forward.seconds_to_compile(self._inputs(kw))
