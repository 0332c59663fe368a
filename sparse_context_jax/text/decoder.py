"""The decoder-only transformer of Qwen3 and Mistral (FLUX.2's text encoders), returning hidden states.

Per layer: h += o(attn(rope(qk_norm(q(n1(h)))), rope(qk_norm(k(n1(h)))), v(n1(h)))); h += mlp(n2(h)), with
RMSNorms n1, n2, grouped-query causal attention over the valid (unpadded) keys and SwiGLU. The q/k norm (Qwen3) and
the sliding window (Mistral) are config fields.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_context_jax.model.layers import Embed, Linear, RMSNorm, stacked
from sparse_context_jax.text.config import DecoderConfig
from sparse_context_jax.text.layers import GatedMLP, apply_rope, attention, rope_tables, visible_keys
from sparse_context_jax.text.stack import run_layers


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    proj = dict(use_bias=cfg.attention_bias, **kw)
    self.dtype, self.scale = dtype, Dh ** -0.5
    self.input_norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype, axis="embed")
    self.q = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.k = Linear(D, (K, Dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **proj)
    self.v = Linear(D, (K, Dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **proj)
    self.o = Linear((H, Dh), D, in_axes=("heads", "head_dim"), out_axes=("embed",), **proj)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(Dh, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
      self.k_norm = RMSNorm(Dh, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.post_norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype, axis="embed")
    self.mlp = GatedMLP(D, cfg.intermediate_size, cfg.hidden_act, **kw)

  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
    """h (B, S, D), cos/sin (S, Dh), mask (B|1, 1, S, S) bool -> h."""
    x = self.input_norm(h).astype(self.dtype)
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, cos, sin).astype(self.dtype)
    k = apply_rope(k, cos, sin).astype(self.dtype)
    h = h + self.o(attention(q, k, v, mask, scale=self.scale))
    return h + self.mlp(self.post_norm(h).astype(self.dtype))


class DecoderEncoder(nnx.Module):
  """Qwen3 / Mistral as a text encoder: token ids -> hidden states (transformers' `output_hidden_states`).

  Args:
    config: the architecture; `config.num_layers` layers are built (a cut model holds only those).
    rngs: initialisation keys.
    dtype: compute dtype of the matmuls and the residual stream (bfloat16 on accelerators); norms, RoPE and the
      softmax run in float32 (float64 when the compute dtype is).
    param_dtype: storage dtype of the parameters.
    scan_layers: run the layers with `jax.lax.scan` (one compiled layer) or unrolled.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True):
    cfg = self.config = config
    self.dtype, self.scan_layers = dtype, scan_layers
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.layers = stacked(lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers,
                          rngs)
    self.final_norm = (RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, axis="embed")
                       if cfg.has_final_norm else None)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               hidden_states: Sequence[int] | None = None) -> jax.Array:
    """Hidden states of the prompts.

    Args:
      input_ids: (B, S) int token ids.
      attention_mask: (B, S), 1 for tokens and 0 for padding (None: no padding). Padded positions are never
        attended to; their own states are computed like transformers' (they attend to the valid keys before them).
      hidden_states: indices into transformers' `hidden_states` (0: the embeddings, i: the output of layer i);
        default all, 0..num_layers. Index `num_hidden_layers` (a model of every layer) is after the final norm,
        as in transformers 5; every other index is before it.
    Returns:
      (len(hidden_states), B, S, hidden_size) in the compute dtype.
    """
    cfg = self.config
    keep = list(range(cfg.num_layers + 1)) if hidden_states is None else [int(i) for i in hidden_states]
    if any(not 0 <= i <= cfg.num_layers for i in keep):
      raise ValueError(f"hidden_states {keep}: this model runs {cfg.num_layers} of {cfg.num_hidden_layers} layers, "
                       f"so indices 0..{cfg.num_layers} exist")
    if input_ids.ndim != 2 or (attention_mask is not None and attention_mask.shape != input_ids.shape):
      raise ValueError(f"input_ids must be (B, S) and attention_mask the same shape; got {input_ids.shape} and "
                       f"{None if attention_mask is None else attention_mask.shape}")
    S = input_ids.shape[1]
    mask = visible_keys(attention_mask, S, causal=True, window=cfg.sliding_window)
    cos, sin = rope_tables(S, cfg.head_dim, cfg.rope_theta, self.dtype)
    h = self.embed(input_ids)
    out = run_layers(self.layers, h, lambda layer, x: layer(x, cos, sin, mask), keep=keep, scan=self.scan_layers)
    if self.final_norm is not None and cfg.num_hidden_layers in keep:
      last = keep.index(cfg.num_hidden_layers)
      out = out.at[last].set(self.final_norm(out[last]).astype(out.dtype))
    return out

