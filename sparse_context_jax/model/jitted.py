"""The MMDiT behind a compiled-program cache: pure function at the jit boundary, parameters passed as state."""

from __future__ import annotations

import jax
from flax import nnx

from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.programs import ProgramCache


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
    self.graphdef, self.state = nnx.split(model)
    self.programs = ProgramCache(self._forward, "mmdit")
    self._unrolled = None   # graphdef with unrolled block stacks, for `flops`

  def _forward(self, state, inputs):
    return nnx.merge(self.graphdef, state)(**inputs)

  @staticmethod
  def _inputs(kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}

  def __call__(self, **kw) -> jax.Array:
    return self.programs(self.state, self._inputs(kw))

  def compiled(self, **kw):
    """The compiled program for these inputs (compiling it if needed), e.g. for `flops(...)`."""
    return self.programs.compiled(self.state, self._inputs(kw))

  def flops(self, **kw) -> float:
    """XLA's FLOP count of the call for these inputs, every layer counted: the program is lowered (not compiled,
    where the backend allows) with the block stacks unrolled, since XLA counts the body of a scan once."""
    if self._unrolled is None:
      model = nnx.merge(self.graphdef, self.state)
      model.scan_layers = False
      self._unrolled = nnx.split(model)[0]
    lowered = jax.jit(lambda state, inputs: nnx.merge(self._unrolled, state)(**inputs)).lower(
        self.state, self._inputs(kw))
    return flops(lowered)

  def compile_seconds(self, **kw) -> float:
    return self.programs.seconds_to_compile(self.state, self._inputs(kw))
