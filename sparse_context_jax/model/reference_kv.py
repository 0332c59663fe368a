"""The reference K/V cache (FLUX.2 klein KV): reference tokens run through the model once, their keys and values
are reused by every later step.

Two modes of `MMDiT.__call__(..., kv_cache_mode=...)`:
- "extract": img is `[target (N) | reference slots (NR)]`. Reference tokens are modulated at a fixed timestep (in
  the image stream of the double blocks and in the single blocks; the text stream keeps its own) and attend only
  to reference keys; text and target attend to every valid key. Each block's reference K/V (after RoPE) is
  returned, stacked on the layer axis (`ReferenceKV`).
- "cached": img is the target alone; each block appends its cached reference K/V to the keys of text and target.

The joint sequence is `[txt | target | references]` here, and diffusers' `[txt | references | target]`: softmax
attention does not depend on the order of its keys, so both give the same result. Padding slots of a sparse bucket
are the last slots of the references; `lengths` excludes them from every attention, as `img_lengths` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KV_MODES = ("extract", "cached")


@dataclasses.dataclass
class ReferenceKV:
  """Every block's reference keys and values, after RoPE, in the compute dtype.

  double / single: (k, v), each (depth, B, NR, H, Dh), for the double / single block stack (None if it is empty).
  lengths: (B,) int32 valid reference slots (the rest is padding, never attended to); None when all are valid.
  """

  double: tuple[jax.Array, jax.Array] | None
  single: tuple[jax.Array, jax.Array] | None
  lengths: jax.Array | None = None

  @property
  def num_ref_tokens(self) -> int:
    """NR, the reference slots (valid and padding)."""
    return next(k.shape[2] for k, _ in self.stacks())

  @property
  def batch(self) -> int:
    return next(k.shape[1] for k, _ in self.stacks())

  def stacks(self):
    return [kv for kv in (self.double, self.single) if kv is not None]

  @property
  def nbytes(self) -> int:
    """Memory of the cache (keys and values of every block)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.double, self.single)))


jax.tree_util.register_dataclass(ReferenceKV, data_fields=["double", "single", "lengths"], meta_fields=[])


def cache_bytes(cfg, batch: int, num_ref_tokens: int, dtype) -> int:
  """Bytes of the `ReferenceKV` of `batch` examples with `num_ref_tokens` slots, for a model config."""
  per_block = 2 * batch * num_ref_tokens * cfg.num_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
  return per_block * (cfg.depth_double + cfg.depth_single)


@dataclasses.dataclass(frozen=True)
class BlockKV:
  """What one block needs in a KV mode (built per block inside the stack's scan, not a pytree).

  n_ref: the reference slots, the last n_ref tokens of the block's joint sequence (extract).
  ref_len: (B,) valid reference keys, at least 1, for the references' own attention (extract); None: all valid.
  ref_mods: the block's modulation at the fixed timestep, (k, B, 1, D) (extract).
  cache: this block's cached (k, v), each (B, NR, H, Dh) (cached).
  """

  n_ref: int
  ref_len: jax.Array | None = None
  ref_mods: jax.Array | None = None
  cache: tuple[jax.Array, jax.Array] | None = None


def per_token(mods: jax.Array, ref_mods: jax.Array, n_ref: int, length: int) -> jax.Array:
  """Modulation (k, B, 1, D) for the first `length - n_ref` tokens and `ref_mods` for the last n_ref:
  (k, B, length, D). Built inside the block, so XLA fuses it into the modulated elementwise ops."""
  is_ref = (jnp.arange(length) >= length - n_ref)[:, None]
  return jnp.where(is_ref, ref_mods, mods)
