"""LoRA: low-rank adapters on the MMDiT's Linear modules, for fine-tuning over frozen base weights.

A LoRA module is one of our `Linear`s (model/layers.py), named by its parameter path without the leaf, e.g.
`double_blocks.img_attn.qkv` (stacked blocks keep their leading layer axis). It gets two `nnx.LoRAParam`s:
`lora_a (layers..., *in_shape, rank)` (random) and `lora_b (layers..., rank, *out_shape)` (zeros, so an attached
model equals its base exactly), and computes y = x . kernel + (alpha / rank) * (x . lora_a) . lora_b.

`config.lora` (configs/base.py) holds `rank` (0 = off), `alpha`, `targets` (regular expressions, each matched
against the whole module path) and `dropout`: as peft does, y = x . kernel + (alpha / rank) * (dropout(x) . lora_a)
. lora_b in training only. The train step turns it on for its own forward pass (`with_dropout`: per-example keys,
per module and per layer, as a `DropoutKeys` variable the block scan slices like any layer state); a model without
those keys (evaluation, sampling, a merge) never drops. The LoRA params are a pure dict `{module path parts...:
{lora_a, lora_b}}` that sits beside the frozen base `params` in the train state (train/state.py); `merge_lora` folds
them into the base.

Written here rather than taken from qwix or `nnx.LoRA`: qwix creates its LoRA params lazily on the first call by
intercepting `dot_general`, which cannot happen inside the model's own `lax.scan` over split layer states, and
`nnx.LoRA` wraps a 2-D (in, out) base module without the multi-axis kernels and logical axes the sharding rules
need. Both would also move the base kernels to new tree paths (checkpoints and the converter read those).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_context_jax.model.layers import lora_dropout as dropout  # noqa: F401  (applied by the Linear)

# What FLUX LoRA trainers target: attention q/k/v and output projections of both streams, the single blocks'
# fused input (q/k/v + MLP in) and output (attention out + MLP out) projections.
DEFAULT_TARGETS = (
    r"double_blocks\.(img|txt)_attn\.qkv",
    r"double_blocks\.(img|txt)_proj",
    r"single_blocks\.attn\.qkv",
    r"single_blocks\.mlp\.fc1",
    r"single_blocks\.proj",
    r"single_blocks\.mlp\.fc2",
)
MLP_TARGETS = (r"double_blocks\.(img|txt)_mlp\.fc[12]",)
MODULATION_TARGETS = (r"(double_blocks\.(img|txt)_mod|single_blocks\.modulation|double_mod_img|double_mod_txt|"
                      r"single_mod)\.lin",)
RANK_AXIS = "lora_rank"   # the logical axis of the rank (parallel/rules.py: never split)


def enabled(lora_cfg) -> bool:
  return lora_cfg is not None and int(lora_cfg.rank) > 0


def scale(lora_cfg) -> float:
  return float(lora_cfg.alpha) / int(lora_cfg.rank)


def module_names(model: nnx.Module, targets: Sequence[str]) -> list[str]:
  """The paths (dot-joined) of the model's `Linear` modules that one of `targets` matches whole, in graph order."""
  from sparse_context_jax.model.layers import Linear
  patterns = [re.compile(t) for t in targets]
  names = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Linear):
      name = ".".join(str(p) for p in path)
      if any(p.fullmatch(name) for p in patterns):
        names.append(name)
  return names


def attach(model: nnx.Module, lora_cfg, rngs: nnx.Rngs) -> list[str]:
  """Adds `lora_a`/`lora_b` to every targeted Linear of `model` (in place), in the kernel's dtype; returns the
  module names. Raises ValueError when the targets match no module."""
  names = module_names(model, tuple(lora_cfg.targets))
  if not names:
    raise ValueError(f"lora.targets {tuple(lora_cfg.targets)} match no Linear module of the model")
  rank, s = int(lora_cfg.rank), scale(lora_cfg)
  for name in names:
    lin = _get(model, name)
    kernel = lin.kernel
    lead = kernel.shape[:kernel.ndim - len(lin.in_shape) - len(lin.out_shape)]
    axes = kernel.get_metadata()["logical_axes"]
    in_axes, out_axes = axes[:len(lin.in_shape)], axes[len(lin.in_shape):]
    fan_in = math.prod(lin.in_shape)
    a = jax.random.normal(rngs.params(), lead + lin.in_shape + (rank,), jnp.float32) / math.sqrt(fan_in)
    lin.lora_a = nnx.LoRAParam(a.astype(kernel.dtype), logical_axes=tuple(in_axes) + (RANK_AXIS,))
    lin.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank,) + lin.out_shape, kernel.dtype),
                               logical_axes=(RANK_AXIS,) + tuple(out_axes))
    lin.lora_scale = s
  return names


class DropoutKeys(nnx.Variable):
  """Key data (layers..., B, 2) of one adapter's input dropout, one key per example (and layer); only ever on the
  train step's transient model, never in a checkpoint."""


def with_dropout(model: nnx.Module, rate: float, example_keys: jax.Array) -> None:
  """Turns on the LoRA input dropout of `model` (in place, for the forward pass of one train step).

  example_keys: (B, 2) key data, one per example of the batch `model` will see. Adapter i (graph order) of a stack
  of n layers gets, per example, the n keys split from fold_in(example key, i): every mask depends on the example
  alone, not on the micro-batch it is in nor on the sharding.
  """
  linears = [node for _, node in nnx.iter_graph(model) if getattr(node, "lora_a", None) is not None]
  if not linears:
    raise ValueError("with_dropout: the model has no LoRA adapters")
  for i, lin in enumerate(linears):
    lead = lin.lora_a.shape[:lin.lora_a.ndim - len(lin.in_shape) - 1]
    n = math.prod(lead)

    def layer_keys(k, i=i, n=n):   # (2,) -> (n, 2)
      return jax.random.key_data(jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(k), i), n))

    keys = jnp.moveaxis(jax.vmap(layer_keys)(example_keys), 1, 0)          # (n, B, 2)
    lin.lora_dropout = float(rate)
    lin.lora_dropout_keys = DropoutKeys(keys.reshape(lead + keys.shape[1:]))


def _get(model, name: str):
  node = model
  for part in name.split("."):
    node = getattr(node, part)
  return node


def delta(a: jax.Array, b: jax.Array, n_in: int, dtype=jnp.float32) -> jax.Array:
  """(layers..., *in, r) x (layers..., r, *out) -> (layers..., *in, *out): A . B over the rank, per layer."""
  lead = a.ndim - n_in - 1
  a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1])).astype(dtype)
  b2 = b.reshape(b.shape[:lead + 1] + (-1,)).astype(dtype)
  d = jnp.einsum("...ir,...ro->...io", a2, b2)
  return d.reshape(a.shape[:-1] + b.shape[lead + 1:])


def flat(tree: dict, prefix: str = "") -> dict:
  """A nested pure dict -> {dotted path: leaf}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
  return out


def modules(lora_params: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{module name: (lora_a, lora_b)} of a LoRA params dict."""
  f = flat(lora_params)
  names = sorted({k.rsplit(".", 1)[0] for k in f})
  return {n: (f[f"{n}.lora_a"], f[f"{n}.lora_b"]) for n in names}


def merge_lora(base_params: dict, lora_params: dict, lora_cfg) -> dict:
  """The base parameters with every LoRA folded in: kernel + (alpha / rank) * A . B, in the kernel's dtype
  (the product in float32). Pure (jit-able); `base_params` is the pure dict of the model's `nnx.Param`s, the
  tree the train state and `convert` checkpoints hold, returned with the same structure."""
  s = scale(lora_cfg)
  kernels = {f"{n}.kernel": ab for n, ab in modules(lora_params).items()}
  missing = sorted(set(kernels) - set(flat(base_params)))
  if missing:
    raise ValueError(f"LoRA modules without a base kernel: {missing[:5]}")

  def visit(node, prefix):
    out = {}
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict):
        out[k] = visit(v, key + ".")
      elif key in kernels:
        a, b = kernels[key]
        out[k] = (v.astype(jnp.float32) + s * delta(a, b, _n_in(a, b, v))).astype(v.dtype)
      else:
        out[k] = v
    return out

  return visit(base_params, "")


def _n_in(a, b, kernel) -> int:
  """The number of input axes of a kernel given its LoRA factors: kernel.ndim = lead + n_in + n_out,
  a.ndim = lead + n_in + 1, b.ndim = lead + 1 + n_out."""
  n_in_plus_lead = a.ndim - 1
  n_out = kernel.ndim - n_in_plus_lead
  lead = b.ndim - 1 - n_out
  return n_in_plus_lead - lead
