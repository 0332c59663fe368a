"""Where each loaded parameter lives: a simple FSDP rule (a placeholder for the full parallelism rules).

Every parameter is split along its largest axis that the mesh's "fsdp" axis (or, without one, all mesh axes
together) divides; the leading layer axis of stacked blocks is never split, since a scan over layers would then
gather every layer on every step. Parameters with no divisible axis are replicated.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def fsdp_sharding(mesh: Mesh | None, shape: tuple[int, ...], layer_axes: int = 0) -> jax.sharding.Sharding:
  """The sharding of one parameter of `shape` whose first `layer_axes` axes stack layers (0 or 1)."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  names = ("fsdp",) if "fsdp" in mesh.axis_names else tuple(mesh.axis_names)
  size = math.prod(mesh.shape[n] for n in names)
  candidates = [a for a in range(layer_axes, len(shape)) if shape[a] % size == 0]
  spec = [None] * len(shape)
  if candidates and size > 1:
    spec[max(candidates, key=lambda a: (shape[a], -a))] = names if len(names) > 1 else names[0]
  return NamedSharding(mesh, PartitionSpec(*spec))
