"""The T5 encoder (FLUX.1's long-prompt encoder): token ids -> last hidden state.

Per layer: h += o(attn(q(n1(h)), k(n1(h)), v(n1(h)), bias)); h += ff(n2(h)), with T5's RMS LayerNorms, no
attention scaling and one relative-position bias (B, H, S, S) computed from the first layer's bucket table and
added in every layer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.model.layers import Embed, Linear, RMSNorm, stacked
from sparse_context_jax.text.config import T5EncoderConfig
from sparse_context_jax.text.layers import MLP, GatedMLP, attention, visible_keys
from sparse_context_jax.text.stack import run_layers


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(S, S) int bucket of key position minus query position, bidirectional, as T5 (Mesh TensorFlow) computes
  it: exact buckets for small distances, logarithmic ones up to `max_distance`, in float32 like the reference (the
  logarithm's rounding decides the bucket at a few boundary distances)."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(dist.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
              * np.float32(half - max_exact))
  large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(dist < max_exact, dist, large)


class T5Layer(nnx.Module):
  def __init__(self, cfg: T5EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    D, H, Dh = cfg.d_model, cfg.num_heads, cfg.d_kv
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    proj = dict(use_bias=False, **kw)
    self.dtype = dtype
    self.attn_norm = RMSNorm(D, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype, axis="embed")
    self.q = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.k = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.v = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.o = Linear((H, Dh), D, in_axes=("heads", "head_dim"), out_axes=("embed",), **proj)
    self.ff_norm = RMSNorm(D, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype, axis="embed")
    self.ff = (GatedMLP(D, cfg.d_ff, cfg.dense_act_fn, **kw) if cfg.is_gated_act
               else MLP(D, cfg.d_ff, cfg.dense_act_fn, use_bias=False, **kw))

  def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.attn_norm(h).astype(self.dtype)
    h = h + self.o(attention(self.q(x), self.k(x), self.v(x), mask, scale=1.0, bias=bias))
    return h + self.ff(self.ff_norm(h).astype(self.dtype))


class T5Encoder(nnx.Module):
  """T5EncoderModel: token ids -> `last_hidden_state`. Options as `DecoderEncoder`'s."""

  def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True):
    cfg = self.config = config
    self.dtype, self.scan_layers = dtype, scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), **kw)
    self.relative_attention_bias = Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                         axes=("buckets", "heads"), **kw)
    self.layers = stacked(lambda r: T5Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype, axis="embed")

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids (B, S) int, attention_mask (B, S) (1 token, 0 padding; None: attend to all) ->
    (B, S, d_model) in the compute dtype."""
    cfg = self.config
    S = input_ids.shape[1]
    buckets = relative_position_buckets(S, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    bias = jnp.transpose(self.relative_attention_bias(jnp.asarray(buckets)), (2, 0, 1))[None]   # (1, H, S, S)
    mask = visible_keys(attention_mask, S, causal=False)
    h = self.embed(input_ids)
    h = run_layers(self.layers, h, lambda layer, x: layer(x, bias, mask), keep=[cfg.num_layers],
                   scan=self.scan_layers)[0]
    return self.final_norm(h).astype(self.dtype)
