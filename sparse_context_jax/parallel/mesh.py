"""The device mesh: three named axes (data, fsdp, tensor) whose sizes come from the config; -1 fills.

The batch is split over (data, fsdp) together: FSDP is data parallelism whose parameters are also sharded, so both
axes see different examples. `tensor` splits heads and MLP columns and sees the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 in `sizes` (data, fsdp, tensor) so that their product is `num_devices`; ValueError if it
  cannot be."""
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(AXES) or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"mesh {tuple(sizes)}: expected {len(AXES)} sizes for {AXES}, each > 0 or one -1 (fills)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {tuple(sizes)}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(sizes: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all) with axes `AXES`. Built as `Mesh(devices, names)` so the axes are
  Auto-typed (explicit axes clash with `jax.jit(in_shardings=...)`)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  if len(devices) == len(jax.devices()):
    try:   # topology-aware order on real hardware; a plain reshape where the helper does not apply (CPU)
      grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:   # noqa: BLE001 - mesh_utils raises assorted errors for fake or irregular topologies
      grid = np.asarray(devices).reshape(shape)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
