"""A roofline step time for a compiled train step: the longer of compute at the chip's bf16 peak and the
collectives of the mesh's parallelism at its inter-chip bandwidth (XLA overlaps the two at best).

Collectives per step and device (ring algorithms, (n-1)/n of the data moved per axis of size n):
- fsdp: parameters all-gathered for the forward and again for the backward, gradients reduce-scattered;
- data: gradients all-reduced (twice their fsdp / tensor shard);
- tensor: the block outputs all-reduced (Megatron rows): 2 per double block (image and text streams), 1 per
  single block, in the forward, the backward and a remat's recomputed forward.
Upper-bound throughput: kernels at peak, no stalls; the memory numbers next to it are the compiler's own.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparse_context_jax.model.mmdit import count_params
from sparse_context_jax.plan.chips import Topology
from sparse_context_jax.train.state import DTYPES


@dataclasses.dataclass(frozen=True)
class Estimate:
  compute_seconds: float
  comm_seconds: float
  step_seconds: float
  mfu: float           # model FLOPs (no remat) / (chips x peak x step time)


def collective_bytes(config, cfg, mesh_shape: tuple[int, int, int], seq: int) -> float:
  """Bytes each device sends per step over the mesh's collectives (see the module docstring)."""
  data, fsdp, tensor = mesh_shape
  params = count_params(cfg)
  p_bytes = np.dtype(DTYPES[config.model.param_dtype]).itemsize
  c_bytes = np.dtype(DTYPES[config.model.dtype]).itemsize
  ring = lambda n: (n - 1) / n
  shard = params / tensor
  total = 0.0
  total += (2 * shard * p_bytes + shard * 4) * ring(fsdp)                  # gathers fwd + bwd, grads scattered
  total += 2 * shard / fsdp * 4 * ring(data)                              # gradient all-reduce
  rows = config.train.batch_size / (data * fsdp) * seq * cfg.hidden_size * c_bytes
  passes = 3 if config.model.remat != "none" else 2
  total += (2 * cfg.depth_double + cfg.depth_single) * passes * 2 * rows * ring(tensor)
  return total


def estimate(config, cfg, topology: Topology, mesh_shape, flops: float, model_flops: float, seq: int) -> Estimate:
  chip, chips = topology.chip, topology.chips
  compute = flops / (chips * chip.peak_bf16_flops)
  comm = collective_bytes(config, cfg, mesh_shape, seq) / chip.ici_bytes_per_s
  step = max(compute, comm)
  return Estimate(compute, comm, step, model_flops / (chips * chip.peak_bf16_flops * step))
