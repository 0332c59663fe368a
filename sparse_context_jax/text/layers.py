"""Pieces shared by the text encoders: masked attention (grouped-query, additive bias), rotate-half RoPE, the
activations of transformers' configs and the two feed-forward shapes.

Shapes: B batch, S tokens, D hidden, H query heads, K key/value heads (H % K == 0), Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.model.layers import Linear
from sparse_context_jax.model.numerics import at_least_float32

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def visible_keys(attention_mask: jax.Array | None, length: int, *, causal: bool,
                 window: int | None = None) -> jax.Array | None:
  """Boolean (B or 1, 1, S, S) of the keys each query may see: valid keys (`attention_mask` (B, S), 1 = token,
  0 = padding), at or before the query if `causal`, fewer than `window` positions back. None: every key."""
  q, k = np.arange(length)[:, None], np.arange(length)[None, :]
  allowed = np.ones((length, length), bool)
  if causal:
    allowed &= k <= q
  if window is not None:
    allowed &= k > q - window
  mask = None if allowed.all() else jnp.asarray(allowed)[None, None]
  if attention_mask is not None:
    keys = (attention_mask > 0)[:, None, None, :]
    mask = keys if mask is None else mask & keys
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float,
              bias: jax.Array | None = None) -> jax.Array:
  """softmax(scale * q.k + bias, masked) . v: q (B, S, H, Dh), k and v (B, S, K, Dh) -> (B, S, H, Dh) in v's dtype.

  Query head h reads key/value head h // (H / K), as transformers' `repeat_kv`. Logits and softmax in (at least)
  float32. A query that sees no key at all (a padded position beyond a sliding window) gets zeros, as torch's
  `scaled_dot_product_attention` (transformers' default) gives it, not NaN.
  """
  B, S, H, Dh = q.shape
  K = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(B, S, K, H // K, Dh)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=acc).reshape(B, H, S, S) * scale
  if bias is not None:
    logits = logits + bias.astype(acc)
  probs = jax.nn.softmax(logits if mask is None else jnp.where(mask, logits, -jnp.inf), axis=-1)
  if mask is not None:
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0)
  probs = probs.astype(v.dtype).reshape(B, K, H // K, S, S)
  return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(B, S, H, Dh)


def rope_tables(length: int, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin (S, Dh) of rotate-half RoPE at positions 0..S-1.

  The angles are those of transformers: inverse frequencies and `position * inv_freq` rounded to float32 (the
  exponent in float32, the power in float64), so a port matches its reference at every position; the cosine and
  sine are then taken in `at_least_float32(dtype)`.
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1.0) / (float(theta) ** exponent.astype(np.float64)).astype(np.float32)
  angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
  angles = jnp.asarray(np.concatenate([angles, angles], axis=-1)).astype(jnp.promote_types(dtype, jnp.float32))
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, S, H, Dh) rotated by (S, Dh) tables: x * cos + rotate_half(x) * sin, in at least float32."""
  xw = at_least_float32(x)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xw[..., half:], xw[..., :half]], axis=-1)
  return xw * cos[:, None, :] + rotated * sin[:, None, :]


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): SwiGLU of Qwen3 / Mistral, gated GELU of T5 v1.1."""

  def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.gate = Linear(dim, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.up = Linear(dim, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.down = Linear(hidden, dim, in_axes=("mlp",), out_axes=("embed",), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(ACTIVATIONS[self.act](self.gate(x)) * self.up(x))


class MLP(nnx.Module):
  """fc2(act(fc1(x))): CLIP's MLP (with biases), the original T5's feed-forward (without)."""

  def __init__(self, dim: int, hidden: int, act: str, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.fc1 = Linear(dim, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.fc2 = Linear(hidden, dim, in_axes=("mlp",), out_axes=("embed",), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))
