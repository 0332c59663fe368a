"""The generator's sampler (packing + the whole Euler loop, `generate.pipeline._generate`) compiled for a TPU
topology with abstract weights: memory per chip for a batch, and the largest batch per chip that fits.

As `generate` runs it: weights replicated on every chip in the compute dtype, the batch split over the chips
(`data`), one program per (batch, target grid, rung).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_context_jax.encoders.base import PromptEmbeddings
from sparse_context_jax.generate.pipeline import in_mesh, _generate
from sparse_context_jax.model.blocks import resolve_attention
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.model.positions import token_grid
from sparse_context_jax.plan.chips import Topology
from sparse_context_jax.plan.train import _OOM, _oom_bytes
from sparse_context_jax.programs import ModuleProgram
from sparse_context_jax.sparse import BucketLadder


@dataclasses.dataclass
class SamplerPlan:
  batch_per_chip: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  code_bytes: int
  compile_seconds: float
  error: str = ""

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes


def plan_sampler(cfg: MMDiTConfig, topology: Topology, devices, *, batch_per_chip: int, resolution: int,
                 refs: int, keep: float, dtype=jnp.bfloat16, txt_len: int = 512, steps: int = 28,
                 attention: str = "auto", cfg_scale: bool = False) -> SamplerPlan:
  """Compiles the sampler for `batch_per_chip` x chips square `resolution` images with `refs` references of the
  same size, kept at the ladder's rung `keep`."""
  mesh = Mesh(devices, ("data",))
  data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
  impl = resolve_attention(attention, dtype, "tpu")
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, attention_impl=impl))
  program = ModuleProgram(model, in_mesh(mesh, _generate), "sample")   # the generator's own sampler
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), program.state)
  grid = token_grid((resolution, resolution))
  rung = BucketLadder().at(keep, (grid,) * refs)
  B, N, M = batch_per_chip * len(devices), grid[0] * grid[1], grid[0] * grid[1]
  spec = lambda shape, dt=jnp.float32, sh=data: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  latents = [spec((B, M, cfg.in_channels)) for _ in range(refs)]
  scores = [spec((B, M)) for _ in range(refs)]
  prompt = PromptEmbeddings(txt=spec((B, txt_len, cfg.context_dim)),
                            y=spec((B, cfg.pooled_dim)) if cfg.pooled_dim else None)
  negative = prompt if cfg_scale else None
  guidance = spec((B,)) if cfg.guidance_embed else None
  args = (spec((B, N, cfg.in_channels)), spec((steps + 1,), sh=replicated), latents, scores,
          spec((B, refs), jnp.int32), prompt, negative, guidance, spec((), sh=replicated) if cfg_scale else None)
  tic = time.perf_counter()
  try:
    compiled = program.programs.jit(state, *args, rung=rung, target_grid=grid).lower(state, *args).compile()
  except Exception as e:   # noqa: BLE001 - only the compiler's out-of-memory is an answer
    if not _OOM.search(str(e)):
      raise
    message = " ".join(str(e).split())[:300]
    return SamplerPlan(batch_per_chip, 0, 0, _oom_bytes(message), 0, time.perf_counter() - tic, message)
  m = compiled.memory_analysis()
  return SamplerPlan(batch_per_chip, m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                     m.generated_code_size_in_bytes, time.perf_counter() - tic)


def largest_batch(cfg: MMDiTConfig, topology: Topology, *, limit: int = 256, on_plan=None,
                  **kw) -> tuple[int, list[SamplerPlan]]:
  """The largest batch per chip (a power of two up to `limit`) whose sampler fits the chip's HBM, 0 if not even
  one example does; and every plan compiled on the way (doubling from 1)."""
  devices = topology.devices()
  plans, best, b = [], 0, 1
  while b <= limit:
    plan = plan_sampler(cfg, topology, devices, batch_per_chip=b, **kw)
    plans.append(plan)
    if on_plan is not None:
      on_plan(plan)
    if plan.error or plan.total_bytes > topology.chip.usable_bytes:
      break
    best, b = b, 2 * b
  return best, plans
