"""Small building blocks of the MMDiT: linear maps over named axes, norms, embeddings.

Every parameter carries `logical_axes` metadata (one name per array axis, before layer stacking) that the
parallelism rules map to mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.model.numerics import at_least_float32, sinusoid_angles

Shape = tuple[int, ...]


def _as_shape(s: int | Sequence[int]) -> Shape:
  return (int(s),) if isinstance(s, (int, np.integer)) else tuple(int(d) for d in s)


def lora_dropout(x: jax.Array, rate: float, keys: jax.Array) -> jax.Array:
  """x (B, ...) with each entry zeroed with probability `rate` and the others scaled by 1 / (1 - rate); example b's
  mask is drawn from keys[b] ((B, 2) key data) alone."""
  if keys.shape[0] != x.shape[0]:
    raise ValueError(f"LoRA dropout keys for {keys.shape[0]} examples, input of shape {x.shape}")
  keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 1.0 - rate, x.shape[1:]))(keys)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Linear(nnx.Module):
  """y = x . kernel + bias, contracting the trailing `in_shape` axes of x into `out_shape` axes.

  A multi-axis kernel keeps structure visible to sharding: e.g. q/k/v as `(D, 3, H, Dh)` so the head axis can be
  split over a tensor-parallel mesh axis without cutting through q, k and v.
  """

  def __init__(self, in_shape, out_shape, *, use_bias: bool, in_axes: Sequence[str], out_axes: Sequence[str],
               dtype, param_dtype, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = _as_shape(in_shape), _as_shape(out_shape)
    if len(in_axes) != len(self.in_shape) or len(out_axes) != len(self.out_shape):
      raise ValueError(f"axis names {in_axes}/{out_axes} do not match shapes {self.in_shape}/{self.out_shape}")
    fan_in = math.prod(self.in_shape)
    kernel = jax.random.normal(rngs.params(), self.in_shape + self.out_shape, param_dtype) / np.sqrt(fan_in)
    self.kernel = nnx.Param(kernel.astype(param_dtype), logical_axes=tuple(in_axes) + tuple(out_axes))
    self.bias = (nnx.Param(jnp.zeros(self.out_shape, param_dtype), logical_axes=tuple(out_axes))
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f"Linear expects trailing dims {self.in_shape}, got input of shape {x.shape}")
    kernel = self.kernel[...].astype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if getattr(self, "lora_a", None) is not None:   # an adapter attached by sparse_context_jax.lora
      a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
      xa = x.astype(self.dtype)
      if getattr(self, "lora_dropout_keys", None) is not None:   # the train step's forward pass only
        xa = lora_dropout(xa, self.lora_dropout, self.lora_dropout_keys[...])
      u = jax.lax.dot_general(xa, a, (contract, ((), ())))
      y = y + self.lora_scale * jax.lax.dot_general(u, b, (((u.ndim - 1,), (0,)), ((), ())))
    return y


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters; statistics in (at least) float32, result in x.dtype."""
  xw = at_least_float32(x)
  mean = jnp.mean(xw, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xw - mean), axis=-1, keepdims=True)
  return ((xw - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned scale (the per-head QK norm of FLUX; `axis="embed"` for a norm over
  the hidden size)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, axis: str = "head_dim"):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns (at least) float32: the caller applies RoPE in that precision and then casts."""
    xw = at_least_float32(x)
    rrms = jax.lax.rsqrt(jnp.mean(jnp.square(xw), axis=-1, keepdims=True) + self.eps)
    return xw * rrms * self.scale[...].astype(xw.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] of `t * max_period ** (-j / (dim / 2))`, in float32.

  `t` is already scaled (x1000). The references evaluate this in float32 (exponent, `exp`, product, `sin`/`cos`),
  which puts the angles of a guidance embedding (up to ~5000 rad) off by up to 4e-4 rad, by amounts that depend on
  the machine's `exp`; here the angles are exact (`numerics.sinusoid_angles`), so this is the exact function of `t`.
  """
  half = dim // 2
  turns = max_period ** (-np.arange(half, dtype=np.float64) / half) / (2 * np.pi)
  args = sinusoid_angles(t[:, None], turns)
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nnx.Module):
  """in_layer -> SiLU -> out_layer (the time, guidance and pooled-vector embedders)."""

  def __init__(self, in_dim: int, hidden: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_layer = Linear(in_dim, hidden, in_axes=("embed_in",), out_axes=("embed",), **kw)
    self.out_layer = Linear(hidden, hidden, in_axes=("embed_in",), out_axes=("embed",), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
  """lin(silu(vec)) -> `n_sets` x (shift, scale, gate), each (B, 1, D)."""

  def __init__(self, dim: int, n_sets: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    self.n_sets = n_sets
    self.lin = Linear(dim, (3 * n_sets, dim), use_bias=use_bias, in_axes=("embed_in",), out_axes=("mod", "embed"),
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, vec: jax.Array) -> jax.Array:
    """vec (B, D) -> (3 * n_sets, B, 1, D), ordered shift1, scale1, gate1[, shift2, scale2, gate2]."""
    return jnp.moveaxis(self.lin(jax.nn.silu(vec)), 1, 0)[:, :, None, :]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  return (1 + scale) * layer_norm(x, eps) + shift


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with a learned scale and bias; statistics in (at least) float32, result in the
  dtype of the statistics (the caller casts)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, axis: str = "embed"):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(at_least_float32(x), self.eps)
    return y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)


class Embed(nnx.Module):
  """A lookup table (num, dim): ids (...) -> rows (..., dim) in the compute dtype."""

  def __init__(self, num: int, dim: int, *, axes: Sequence[str], dtype, param_dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num, dim), param_dtype), logical_axes=tuple(axes))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module | None:
  """`n` modules from `make`, their parameters stacked on a new leading layer axis (one `nnx.vmap`); None for 0.

  PARTITION_NAME None: the layer axis is recorded in each parameter's metadata as unsharded, so shardings built
  from the metadata (and the optimizer's view of it) know the axis exists and never split it.
  """
  if n == 0:
    return None

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
  def create(r):
    return make(r)

  return create(rngs)
