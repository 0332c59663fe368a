"""Logical-axis rules: the one place that decides where every parameter lives (nanodo's fsdp.py, as data).

Every parameter carries `logical_axes`, one name per axis before layer stacking (model/layers.py). A rule maps a
name to a mesh axis; an axis is split only if the mesh axis divides it and no earlier axis of the same parameter
already uses that mesh axis, else it is replicated. The leading layer axis of stacked blocks is never split: a
scan over layers would gather every layer on every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# embed -> fsdp (ZeRO-3 style: weights gathered per layer); heads / mlp -> tensor (Megatron columns and rows).
# embed_in is the input side of modulation / embedder matrices whose output is already `embed`. Text encoders add
# kv_heads (grouped-query k/v, split like heads where they divide), and lookup tables over vocab, positions and
# relative-position buckets, whose rows stay whole (their `embed` columns are split).
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp", "embed_in": None, "heads": "tensor", "head_dim": None, "qkv": None, "mlp": "tensor",
    "mod": None, "channels": None, "context": None,
    "kv_heads": "tensor", "vocab": None, "positions": None, "buckets": None,
    "lora_rank": None,   # LoRA factors: A over embed (fsdp), B over heads / mlp (tensor); the rank stays whole
}


def param_sharding(mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str],
                   rules: Mapping[str, str | None] = DEFAULT_RULES) -> NamedSharding:
  """The sharding of one parameter of `shape` whose trailing axes are named by `logical_axes` (leading extra
  axes are layer stacks)."""
  layer_axes = len(shape) - len(logical_axes)
  if layer_axes < 0:
    raise ValueError(f"parameter of shape {tuple(shape)} has more logical axes than dimensions: {logical_axes}")
  spec, used = [None] * len(shape), set()
  for i, name in enumerate(logical_axes):
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule (known: {sorted(rules)})")
    axis = rules[name]
    dim = shape[layer_axes + i]
    if axis is None or axis in used or axis not in mesh.shape or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      continue
    spec[layer_axes + i] = axis
    used.add(axis)
  return NamedSharding(mesh, PartitionSpec(*spec))


def param_shardings(mesh: Mesh, abstract_params: nnx.State,
                    rules: Mapping[str, str | None] = DEFAULT_RULES) -> nnx.State:
  """Shardings of an (abstract) `nnx.State` of parameters, as a State of the same structure (pure leaves)."""
  def one(var):
    return param_sharding(mesh, var.shape, var.get_metadata()["logical_axes"], rules)
  return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
