"""One denoiser call dense and sparse, side by side: outputs on the target tokens, latency and FLOPs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from sparse_context_jax.model.jitted import JittedMMDiT
from sparse_context_jax.sparse.pack import PackedInputs, Reference, SparsePacker, SparseRequest, dense_inputs


@dataclasses.dataclass
class Comparison:
  dense: np.ndarray            # (B, N, C) target prediction with every reference token
  sparse: np.ndarray           # (B, N, C) with the request's tokens only
  packed: PackedInputs
  dense_seconds: float         # median latency of one call (compiled, warmed up)
  sparse_seconds: float
  dense_flops: float           # XLA's count for the compiled programs
  sparse_flops: float

  @property
  def rel_err(self) -> float:
    """max |sparse - dense| / max |dense| on the target tokens."""
    return float(np.max(np.abs(self.sparse - self.dense)) / np.max(np.abs(self.dense)))

  @property
  def speedup(self) -> float:
    return self.dense_seconds / self.sparse_seconds

  @property
  def ideal_speedup(self) -> float:
    return self.dense_flops / self.sparse_flops


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
  """Median seconds of each `fns[name]()`, timed in interleaved rounds (one call of each per round), so a slow
  drift of the machine's speed affects every program alike and their ratios stay honest."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def compare_dense_sparse(model: JittedMMDiT, packer: SparsePacker, *, txt, timesteps, txt_ids, target_latents,
                         target_size, references: Sequence[Reference], request: SparseRequest, y=None,
                         guidance=None, repeats: int = 3) -> Comparison:
  """Runs the denoiser once with dense references and once with `request`'s sparse references."""
  common = dict(txt=txt, timesteps=timesteps, txt_ids=txt_ids, y=y, guidance=guidance)
  img, img_ids = dense_inputs(model.config, target_latents, target_size, references)
  packed = packer(target_latents, target_size, references, request)
  dense_kw = dict(img=img, img_ids=img_ids, **common)
  sparse_kw = dict(img=packed.img, img_ids=packed.img_ids, img_lengths=packed.img_lengths, **common)
  n = target_latents.shape[1]
  seconds = interleaved_medians({"dense": lambda: model(**dense_kw), "sparse": lambda: model(**sparse_kw)}, repeats)
  return Comparison(
      dense=np.asarray(model(**dense_kw))[:, :n],
      sparse=np.asarray(packed.target(model(**sparse_kw))),
      packed=packed,
      dense_seconds=seconds["dense"],
      sparse_seconds=seconds["sparse"],
      dense_flops=model.flops(**dense_kw),
      sparse_flops=model.flops(**sparse_kw),
  )
