"""The CLIP text tower (FLUX.1's pooled-vector encoder): token ids -> last hidden state and pooled vector.

Per layer: h += out(attn(n1(h))); h += mlp(n2(h)), LayerNorms with bias, causal attention, quick-GELU MLP; then a
final LayerNorm. The pooled vector is the final state at the end-of-text token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_context_jax.model.layers import Embed, LayerNorm, Linear, stacked
from sparse_context_jax.text.config import CLIPTextConfig
from sparse_context_jax.text.layers import MLP, attention, visible_keys
from sparse_context_jax.text.stack import run_layers


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array   # (B, S, D)
  pooler_output: jax.Array       # (B, D)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """(B,) position of the end-of-text token: with `eos_token_id == 2` (configs before transformers fixed it) the
  position of the largest id, else the first position holding `eos_token_id` (0 when there is none)."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPLayer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    proj = dict(use_bias=True, **kw)
    self.dtype, self.scale = dtype, Dh ** -0.5
    self.norm1 = LayerNorm(D, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.q = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.k = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.v = Linear(D, (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"), **proj)
    self.o = Linear((H, Dh), D, in_axes=("heads", "head_dim"), out_axes=("embed",), **proj)
    self.norm2 = LayerNorm(D, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(D, cfg.intermediate_size, cfg.hidden_act, use_bias=True, **kw)

  def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.norm1(h).astype(self.dtype)
    h = h + self.o(attention(self.q(x), self.k(x), self.v(x), mask, scale=self.scale))
    return h + self.mlp(self.norm2(h).astype(self.dtype))


class CLIPTextEncoder(nnx.Module):
  """CLIPTextModel: token ids -> `CLIPTextOutput(last_hidden_state, pooler_output)`. Options as
  `DecoderEncoder`'s."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True):
    cfg = self.config = config
    self.dtype, self.scan_layers = dtype, scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embed = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
    self.position_embed = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=("positions", "embed"), **kw)
    self.layers = stacked(lambda r: CLIPLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers,
                          rngs)
    self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    """input_ids (B, S) int with S <= max_position_embeddings; attention_mask (B, S) (1 token, 0 padding; None:
    causal only, as FLUX.1 calls it)."""
    cfg = self.config
    S = input_ids.shape[1]
    if S > cfg.max_position_embeddings:
      raise ValueError(f"{S} tokens; this CLIP takes at most max_position_embeddings={cfg.max_position_embeddings}")
    mask = visible_keys(attention_mask, S, causal=True)
    h = self.token_embed(input_ids) + self.position_embed(jnp.arange(S))[None]
    h = run_layers(self.layers, h, lambda layer, x: layer(x, mask), keep=[cfg.num_layers], scan=self.scan_layers)[0]
    h = self.final_norm(h).astype(self.dtype)
    pooled = jnp.take_along_axis(h, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(h, pooled)
