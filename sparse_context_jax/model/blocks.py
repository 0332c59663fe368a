"""Double-stream and single-stream MMDiT blocks, shared by FLUX.1 and FLUX.2.

Shapes: B batch, T text tokens, L image tokens (target, references, padding), S = T + L, D hidden,
H heads, Dh head dim. Attention runs over the joint sequence [txt | img]; `kv_len (B,)` counts the valid keys
(T + valid image tokens), so padding at the end of the image tokens is never attended to. With a `BlockKV`, a block
runs a mode of the reference K/V cache (`reference_kv`) and also returns its reference (k, v) when extracting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.model import splash
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.layers import Linear, Modulation, RMSNorm, modulate
from sparse_context_jax.model.reference_kv import BlockKV, per_token
from sparse_context_jax.model.rope import apply_rope


ATTENTION_IMPLS = (None, "xla", "cudnn", "splash", "auto")


def resolve_attention(impl: str | None, dtype, platform: str | None = None) -> str | None:
  """`impl`, with "auto" made concrete for `platform` (default: jax's default backend): splash on TPU, cuDNN on
  GPU for 16-bit compute (cuDNN's fused kernel takes no float32), XLA otherwise."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash"
  if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None, impl: str | None) -> jax.Array:
  """Softmax attention, (B, S, H, Dh) each -> (B, S, H, Dh); logits and softmax in (at least) float32.

  impl: None (jax's choice), "xla", "cudnn" (`jax.nn.dot_product_attention`) or "splash" (the Pallas TPU kernel,
  `model/splash.py`); "auto" is resolved by the model (`resolve_attention`) before it gets here.

  q and k arrive in float32 (after their RMSNorm). cuDNN's fused kernel takes one 16-bit dtype for q, k and v (it
  still accumulates logits and softmax in float32), so with impl "cudnn" q and k are cast to v's dtype.
  `jax.nn.dot_product_attention` runs its softmax in float32 whatever the inputs, so float64 (the exact-arithmetic
  parity check) takes a plain masked softmax instead.
  """
  if q.dtype == jnp.float64:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if kv_len is not None:
      logits = jnp.where(jnp.arange(k.shape[1]) < kv_len[:, None, None, None], logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
  if impl == "splash":
    return splash.attention(q, k, v, kv_len)
  if impl == "cudnn":
    q, k = q.astype(v.dtype), k.astype(v.dtype)
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len, implementation=impl)


def joint_attention(q, k, v, kv_len, impl: str | None, kv: BlockKV | None):
  """`attention` over the joint sequence, in the reference K/V mode `kv` when given -> (out, reference (k, v)).

  extract: the last `kv.n_ref` queries (the reference slots) attend to their own keys only, the others to every
  valid key; the slots' (k, v) are returned. cached: the cached reference keys follow the sequence's own, `kv_len`
  counting them. Otherwise the plain attention, and None.
  """
  if kv is None:
    return attention(q, k, v, kv_len, impl), None
  if kv.cache is not None:
    k, v = (jnp.concatenate([x, c.astype(x.dtype)], axis=1) for x, c in zip((k, v), kv.cache))
    return attention(q, k, v, kv_len, impl), None
  s = q.shape[1] - kv.n_ref
  rest = attention(q[:, :s], k, v, kv_len, impl)
  refs = attention(q[:, s:], k[:, s:], v[:, s:], kv.ref_len, impl)
  return jnp.concatenate([rest, refs], axis=1), (k[:, s:], v[:, s:])


def _reference_mods(mods, kv: BlockKV | None, length: int):
  """Per-token modulation when extracting (the reference slots at the fixed timestep's), else `mods` as given."""
  if kv is None or kv.ref_mods is None:
    return mods
  return per_token(mods, kv.ref_mods, kv.n_ref, length)


class QKV(nnx.Module):
  """Fused q/k/v projection with per-head QK RMSNorm: x (B, S, D) -> q, k (float32), v, each (B, S, H, Dh)."""

  def __init__(self, cfg: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.qkv = Linear(cfg.hidden_size, (3, cfg.num_heads, cfg.head_dim), use_bias=cfg.bias, in_axes=("embed",),
                      out_axes=("qkv", "heads", "head_dim"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_norm = RMSNorm(cfg.head_dim, eps=cfg.eps, param_dtype=param_dtype)
    self.key_norm = RMSNorm(cfg.head_dim, eps=cfg.eps, param_dtype=param_dtype)

  def __call__(self, x: jax.Array):
    qkv = self.qkv(x)
    return self.query_norm(qkv[:, :, 0]), self.key_norm(qkv[:, :, 1]), qkv[:, :, 2]


class MLP(nnx.Module):
  """GELU-tanh MLP (FLUX.1) or SwiGLU with the gate first (FLUX.2)."""

  def __init__(self, cfg: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs, fc2_bias: bool | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.kind = cfg.mlp
    self.fc1 = Linear(cfg.hidden_size, cfg.mlp_in_features, use_bias=cfg.bias, in_axes=("embed",),
                      out_axes=("mlp",), **kw)
    self.fc2 = Linear(cfg.mlp_hidden, cfg.hidden_size, use_bias=cfg.bias if fc2_bias is None else fc2_bias,
                      in_axes=("mlp",), out_axes=("embed",), **kw)

  def activate(self, h: jax.Array) -> jax.Array:
    if self.kind == "swiglu":
      gate, up = jnp.split(h, 2, axis=-1)
      return jax.nn.silu(gate) * up
    return jax.nn.gelu(h, approximate=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.activate(self.fc1(x)))


def _modulation(cfg: MMDiTConfig, n_sets: int, *, dtype, param_dtype, rngs) -> Modulation | None:
  """Per-block modulation for FLUX.1; None for FLUX.2, whose blocks receive the shared one."""
  if cfg.shared_modulation:
    return None
  return Modulation(cfg.hidden_size, n_sets, use_bias=cfg.bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DoubleBlock(nnx.Module):
  """Separate weights for the image and text streams, joint attention over [txt | img]."""

  def __init__(self, cfg: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.eps, self.dtype, self.attention_impl = cfg.eps, dtype, attention_impl
    self.img_mod = _modulation(cfg, 2, **kw)
    self.txt_mod = _modulation(cfg, 2, **kw)
    self.img_attn = QKV(cfg, **kw)
    self.txt_attn = QKV(cfg, **kw)
    out = dict(use_bias=cfg.bias, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)
    self.img_proj = Linear((cfg.num_heads, cfg.head_dim), cfg.hidden_size, **out)
    self.txt_proj = Linear((cfg.num_heads, cfg.head_dim), cfg.hidden_size, **out)
    self.img_mlp = MLP(cfg, **kw)
    self.txt_mlp = MLP(cfg, **kw)

  def __call__(self, img, txt, vec, angles, kv_len, shared_mods, kv: BlockKV | None = None):
    """img (B, L, D), txt (B, T, D), vec (B, D), angles (B, S, Dh/2) -> (img, txt, reference (k, v) or None).

    `shared_mods` is (mods_img, mods_txt), each (6, B, 1, D), when the modulation is shared, else None. When
    extracting, `kv.ref_mods` modulates the image stream's reference slots.
    """
    return self.update(img, txt, *self.project(img, txt, vec, angles, shared_mods, kv), kv_len, kv)

  def project(self, img, txt, vec, angles, shared_mods, kv: BlockKV | None = None):
    """The block's attention inputs over [txt | img]: (q, k, v) each (B, S, H, Dh) in the compute dtype (what the
    attention sees), and the modulations (m_img, m_txt); the `attention` selection strategy reads q and k here."""
    m_img, m_txt = shared_mods if shared_mods is not None else (self.img_mod(vec), self.txt_mod(vec))
    m_img = _reference_mods(m_img, kv, img.shape[1])
    q_i, k_i, v_i = self.img_attn(modulate(img, m_img[0], m_img[1], self.eps))
    q_t, k_t, v_t = self.txt_attn(modulate(txt, m_txt[0], m_txt[1], self.eps))
    q = apply_rope(jnp.concatenate([q_t, q_i], axis=1), angles).astype(self.dtype)
    k = apply_rope(jnp.concatenate([k_t, k_i], axis=1), angles).astype(self.dtype)
    v = jnp.concatenate([v_t, v_i], axis=1).astype(self.dtype)
    return (q, k, v), (m_img, m_txt)

  def update(self, img, txt, qkv, mods, kv_len, kv: BlockKV | None = None):
    """The rest of the block from `project`'s outputs: attention, projections and MLPs -> (img, txt, ref (k, v))."""
    (q, k, v), (m_img, m_txt) = qkv, mods
    t = txt.shape[1]
    a, ref_kv = joint_attention(q, k, v, kv_len, self.attention_impl, kv)
    img = img + m_img[2] * self.img_proj(a[:, t:])
    img = img + m_img[5] * self.img_mlp(modulate(img, m_img[3], m_img[4], self.eps))
    txt = txt + m_txt[2] * self.txt_proj(a[:, :t])
    txt = txt + m_txt[5] * self.txt_mlp(modulate(txt, m_txt[3], m_txt[4], self.eps))
    return img, txt, ref_kv


class SingleBlock(nnx.Module):
  """Parallel attention + MLP over h = [txt | img]: h += gate * (proj(attn) + fc2(act(fc1)))."""

  def __init__(self, cfg: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.eps, self.dtype, self.attention_impl = cfg.eps, dtype, attention_impl
    self.modulation = _modulation(cfg, 1, **kw)
    self.attn = QKV(cfg, **kw)
    # BFL's `linear2` over cat[attn, mlp] is the sum of two matmuls; its bias lives on the attention half.
    self.proj = Linear((cfg.num_heads, cfg.head_dim), cfg.hidden_size, use_bias=cfg.bias,
                       in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)
    self.mlp = MLP(cfg, fc2_bias=False, **kw)

  def __call__(self, h, vec, angles, kv_len, shared_mods, kv: BlockKV | None = None):
    """h (B, S, D), vec (B, D), angles (B, S, Dh/2) -> (h, reference (k, v) or None).

    `shared_mods` is (3, B, 1, D) or None; when extracting, `kv.ref_mods` modulates the reference slots.
    """
    m = shared_mods if shared_mods is not None else self.modulation(vec)
    m = _reference_mods(m, kv, h.shape[1])
    x = modulate(h, m[0], m[1], self.eps)
    q, k, v = self.attn(x)
    q = apply_rope(q, angles).astype(self.dtype)
    k = apply_rope(k, angles).astype(self.dtype)
    a, ref_kv = joint_attention(q, k, v.astype(self.dtype), kv_len, self.attention_impl, kv)
    return h + m[2] * (self.proj(a) + self.mlp(x)), ref_kv
