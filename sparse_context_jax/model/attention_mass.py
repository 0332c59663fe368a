"""Attention mass on the image keys: what the training-free `attention` selection strategy ranks reference tokens by
(ReCAST-style).

One dense forward of the first double-stream blocks at the first denoising step (every reference token present; the
model's own inputs, masks and, for a reference-K/V model, its extract mode). At each chosen block, the softmax
probability that every text and target query puts on every key, summed over those queries and averaged over heads,
then averaged over the blocks. The attention matrix is never materialised: two passes over blocks of `key_block`
keys, first the online-softmax row max and normaliser over all keys, then each block's probabilities summed over
the queries, so memory is O(queries x key_block) per head, not O(queries x keys). The forward stops after the last
chosen block (no single-stream blocks, no final layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.numerics import at_least_float32

KEY_BLOCK = 512   # keys per block of the two passes


def default_blocks(cfg: MMDiTConfig) -> tuple[int, ...]:
  """Three evenly spaced double blocks (first, middle, last; fewer when the model has fewer)."""
  n = cfg.depth_double
  return tuple(sorted({int(round(x)) for x in np.linspace(0, n - 1, min(3, n))}))


def resolve_blocks(cfg: MMDiTConfig, blocks: Sequence[int] | None) -> tuple[int, ...]:
  """`blocks` (double-block indices) sorted and unique, or the default; ValueError naming what the model has."""
  if cfg.depth_double == 0:
    raise ValueError("the attention strategy reads double-stream blocks; this model has none")
  if blocks is None:
    return default_blocks(cfg)
  blocks = tuple(blocks)
  if not blocks or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < cfg.depth_double
                       for b in blocks):
    raise ValueError(f"attention_blocks={list(blocks)} must be indices of double blocks, in [0, "
                     f"{cfg.depth_double - 1}] (the model has {cfg.depth_double})")
  return tuple(sorted({int(b) for b in blocks}))


def key_mass(q: jax.Array, k: jax.Array, kv_len: jax.Array | None, key_block: int = KEY_BLOCK) -> jax.Array:
  """Softmax attention probability summed over the queries, averaged over heads, per key, by blocks of keys.

  q (B, Q, H, Dh), k (B, K, H, Dh), kv_len (B,) valid keys (keys at or past it are masked as `blocks.attention`
  masks them) or None -> (B, K) float32; masked keys get 0. Logits and softmax in (at least) float32.
  """
  B, Q, H, Dh = q.shape
  K = k.shape[1]
  n_blocks = -(-K // key_block)
  q = at_least_float32(q) / np.sqrt(Dh)
  k = jnp.pad(at_least_float32(k), ((0, 0), (0, n_blocks * key_block - K), (0, 0), (0, 0)))
  limit = jnp.full((B,), K) if kv_len is None else jnp.minimum(kv_len, K)
  valid = jnp.arange(n_blocks * key_block)[None, :] < limit[:, None]        # block padding is invalid too
  blocked = lambda x: jnp.moveaxis(x.reshape(B, n_blocks, key_block, *x.shape[2:]), 1, 0)
  k_blocks, valid_blocks = blocked(k), blocked(valid)                        # (n, B, kb, H, Dh), (n, B, kb)

  def logits(k_b, valid_b):                                                  # (B, H, Q, kb)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_b)
    return jnp.where(valid_b[:, None, None, :], s, -jnp.inf)

  def statistics(carry, block):
    row_max, norm = carry
    s = logits(*block)
    new_max = jnp.maximum(row_max, s.max(axis=-1))
    shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)                  # no valid key yet: nothing to shift
    norm = norm * jnp.exp(row_max - shift) + jnp.exp(s - shift[..., None]).sum(axis=-1)
    return (new_max, norm), None

  init = (jnp.full((B, H, Q), -jnp.inf, q.dtype), jnp.zeros((B, H, Q), q.dtype))
  (row_max, norm), _ = jax.lax.scan(statistics, init, (k_blocks, valid_blocks))
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  norm = jnp.where(norm > 0, norm, 1.0)

  def mass(_, block):
    p = jnp.exp(logits(*block) - row_max[..., None]) / norm[..., None]
    return None, p.sum(axis=2).mean(axis=1)                                  # (B, kb)

  _, per_block = jax.lax.scan(mass, None, (k_blocks, valid_blocks))
  return jnp.moveaxis(per_block, 0, 1).reshape(B, n_blocks * key_block)[:, :K]


def attention_mass(model, img, txt, timesteps, img_ids, txt_ids, *, n_target: int, blocks: Sequence[int],
                   key_block: int = KEY_BLOCK, y=None, guidance=None, img_lengths=None) -> jax.Array:
  """(B, L) attention mass of every image key: what the text and the `n_target` target queries put on it at the
  double blocks `blocks`, summed over the queries, averaged over heads and blocks (`key_mass`).

  Arguments as `MMDiT.__call__` (img: the N target tokens then the references, dense; padding past `img_lengths`
  gets 0). A model whose config says `reference_attention="kv"` runs its first step's extract mode (references
  modulated at timestep 0); the text and target queries attend to every valid key either way.
  """
  cfg = model.config
  blocks = resolve_blocks(cfg, blocks)
  L, T = img.shape[1], txt.shape[1]
  kv = dict(kv_cache_mode="extract", num_ref_tokens=L - n_target) if (
      cfg.reference_attention == "kv" and cfg.shared_modulation and L > n_target) else {}
  s = model.block_inputs(img, txt, timesteps, img_ids, txt_ids, y=y, guidance=guidance, img_lengths=img_lengths,
                         **kv)
  graphdef, state = nnx.split(model.double_blocks)
  x, c, total = s.img, s.txt, 0.0
  for i in range(blocks[-1] + 1):   # unrolled: the forward stops after the last chosen block
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    block_kv = s.double_kv(None)
    qkv, mods = block.project(x, c, s.vec, s.angles, s.double_mods, block_kv)
    if i in blocks:
      q, k, _ = qkv
      total = total + key_mass(q[:, :T + n_target], k, s.kv_len, key_block)
    if i < blocks[-1]:
      x, c, _ = block.update(x, c, qkv, mods, s.kv_len, block_kv)
  return total[:, T:] / len(blocks)
