"""The FLUX MMDiT: embedders, a stack of double-stream blocks, a stack of single-stream blocks, the final layer.

Blocks are created stacked along a leading layer axis (one `nnx.vmap`) and run with `jax.lax.scan` (or unrolled),
optionally rematerialised per block with a `jax.checkpoint` policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_context_jax.model.blocks import DoubleBlock, SingleBlock, resolve_attention
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.layers import Linear, MLPEmbedder, Modulation, modulate, stacked, timestep_embedding
from sparse_context_jax.model.numerics import at_least_float32
from sparse_context_jax.model.reference_kv import KV_MODES, BlockKV, ReferenceKV
from sparse_context_jax.model.rope import rope_angles

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save only each block's inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BlockInputs(NamedTuple):
  """What every block of one call reads (`MMDiT.block_inputs`); shapes as in `blocks.py`."""

  img: jax.Array                 # (B, L, D) embedded image tokens (padding zeroed)
  txt: jax.Array                 # (B, T, D) embedded text tokens
  vec: jax.Array                 # (B, D)
  angles: jax.Array              # (B, T + L, Dh / 2) RoPE angles of [txt | img]
  kv_len: jax.Array | None       # (B,) valid keys, or None when every key is valid
  valid: jax.Array | None        # (B, L, 1) valid image tokens, or None
  double_mods: tuple | None      # shared modulations (FLUX.2), else None
  single_mods: jax.Array | None
  double_kv: Callable            # cache slice -> BlockKV | None, per stack
  single_kv: Callable
  ref_len: jax.Array | None      # (B,) valid reference slots of an extract call


class FinalLayer(nnx.Module):
  def __init__(self, cfg: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.eps = cfg.eps
    # Rows ordered (shift, scale) as in BFL; diffusers' AdaLayerNormContinuous stores (scale, shift).
    self.adaLN = Linear(cfg.hidden_size, (2, cfg.hidden_size), in_axes=("embed_in",), out_axes=("mod", "embed"),
                        **kw)
    self.linear = Linear(cfg.hidden_size, cfg.out_channels, in_axes=("embed",), out_axes=("channels",), **kw)

  def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
    m = self.adaLN(jax.nn.silu(vec))[:, :, None, :]
    return self.linear(modulate(x, m[:, 0], m[:, 1], self.eps))


class MMDiT(nnx.Module):
  """FLUX.1 / FLUX.2 transformer with reference images as extra image tokens.

  Args:
    config: the architecture.
    rngs: initialisation keys.
    dtype: compute dtype of the matmuls and the residual stream (bfloat16 on accelerators). Norm statistics,
      RoPE, the timestep embedding and the softmax always run in float32 (float64 when the compute dtype is).
    param_dtype: storage dtype of the parameters.
    scan_layers: run each block stack with `jax.lax.scan` (one compiled block) or unrolled.
    remat: "none", "full", "dots" or "dots_no_batch": `jax.checkpoint` policy around each block.
    attention_impl: None, "xla" or "cudnn" (`jax.nn.dot_product_attention`'s `implementation`), "splash" (the
      Pallas TPU kernel; interpreted off TPU) or "auto" (splash on TPU, cuDNN on GPU for 16-bit compute, else XLA;
      for the default backend: pass a concrete one to build for another, `blocks.resolve_attention`).
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True, remat: str = "none", attention_impl: str | None = None):
    if remat != "none" and remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")
    cfg = self.config = config
    self.dtype, self.scan_layers, self.remat = dtype, scan_layers, remat
    attention_impl = self.attention_impl = resolve_attention(attention_impl, dtype)
    D = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    lin = dict(use_bias=cfg.bias, **kw)
    self.img_in = Linear(cfg.in_channels, D, in_axes=("channels",), out_axes=("embed",), **lin)
    self.txt_in = Linear(cfg.context_dim, D, in_axes=("context",), out_axes=("embed",), **lin)
    self.time_in = MLPEmbedder(cfg.time_channels, D, **lin)
    self.guidance_in = MLPEmbedder(cfg.time_channels, D, **lin) if cfg.guidance_embed else None
    self.vector_in = MLPEmbedder(cfg.pooled_dim, D, **lin) if cfg.pooled_dim else None
    if cfg.shared_modulation:
      self.double_mod_img = Modulation(D, 2, **lin)
      self.double_mod_txt = Modulation(D, 2, **lin)
      self.single_mod = Modulation(D, 1, **lin)
    else:
      self.double_mod_img = self.double_mod_txt = self.single_mod = None
    block_kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    self.double_blocks = stacked(lambda r: DoubleBlock(cfg, rngs=r, **block_kw), cfg.depth_double, rngs)
    self.single_blocks = stacked(lambda r: SingleBlock(cfg, rngs=r, **block_kw), cfg.depth_single, rngs)
    self.final_layer = FinalLayer(cfg, **kw)

  def __call__(self, img, txt, timesteps, img_ids, txt_ids, *, y=None, guidance=None, img_lengths=None,
               kv_cache_mode: str | None = None, num_ref_tokens: int = 0, kv_cache: ReferenceKV | None = None,
               ref_fixed_timestep: float = 0.0):
    """Velocity prediction for every image token.

    Args:
      img: (B, L, in_channels) target tokens, then reference tokens, then padding (the target alone when cached).
      txt: (B, T, context_dim) text features.
      timesteps: (B,) sigma in [0, 1] (multiplied by 1000 here, in float32 as the references do).
      img_ids: (B, L, n_axes) or (L, n_axes) position ids; txt_ids: (B, T, n_axes) or (T, n_axes).
      y: (B, pooled_dim) pooled text vector (FLUX.1).
      guidance: (B,) guidance scale, for models with a guidance embedder.
      img_lengths: (B,) int, image tokens at positions >= img_lengths[b] are padding: they are never attended to,
        their contents and ids are ignored, and their outputs are zero.
      kv_cache_mode: None (joint attention), "extract" or "cached": the reference K/V cache (`reference_kv`).
      num_ref_tokens: extract: NR (static), the reference slots after the N = L - NR target tokens (reference
        tokens, then padding as `img_lengths` says).
      kv_cache: cached: the `ReferenceKV` an extract call returned.
      ref_fixed_timestep: extract: the sigma at which the reference tokens are modulated.
    Returns:
      (B, L, out_channels) in the compute dtype; extract: (that, the `ReferenceKV`).
    """
    T = txt.shape[1]
    s = self.block_inputs(img, txt, timesteps, img_ids, txt_ids, y=y, guidance=guidance, img_lengths=img_lengths,
                          kv_cache_mode=kv_cache_mode, num_ref_tokens=num_ref_tokens, kv_cache=kv_cache,
                          ref_fixed_timestep=ref_fixed_timestep)

    def double(blk, carry, cache):
      img_, txt_, refs = blk(*carry, s.vec, s.angles, s.kv_len, s.double_mods, s.double_kv(cache))
      return (img_, txt_), refs

    (x, c), double_refs = self._run(self.double_blocks, (s.img, s.txt), double,
                                    None if kv_cache is None else kv_cache.double)
    h, single_refs = self._run(
        self.single_blocks, jnp.concatenate([c, x], axis=1),
        lambda blk, carry, cache: blk(carry, s.vec, s.angles, s.kv_len, s.single_mods, s.single_kv(cache)),
        None if kv_cache is None else kv_cache.single)
    out = self.final_layer(h[:, T:], s.vec)
    if s.valid is not None:
      out = jnp.where(s.valid, out, 0)
    if kv_cache_mode == "extract":
      return out, ReferenceKV(double_refs, single_refs, s.ref_len)
    return out

  def block_inputs(self, img, txt, timesteps, img_ids, txt_ids, *, y=None, guidance=None, img_lengths=None,
                   kv_cache_mode: str | None = None, num_ref_tokens: int = 0, kv_cache: ReferenceKV | None = None,
                   ref_fixed_timestep: float = 0.0) -> BlockInputs:
    """What every block reads, from the arguments of `__call__` (validated here): the embedded streams, the
    vector, the RoPE angles, the valid key counts and the modulations. `__call__` runs the blocks on it; the
    `attention` selection strategy (`model/attention_mass.py`) runs the first double blocks."""
    cfg = self.config
    L, T = img.shape[1], txt.shape[1]
    img_ids, txt_ids = self._check_inputs(img, txt, timesteps, img_ids, txt_ids, y, guidance, img_lengths)
    self._check_kv(img, kv_cache_mode, num_ref_tokens, kv_cache, img_lengths)
    if kv_cache_mode == "extract" and img_lengths is None:
      # dense references run the program of a full bucket: the two give bit-equal results
      img_lengths = jnp.full((img.shape[0],), L, jnp.int32)

    kv_len = valid = None
    if img_lengths is not None:
      valid = (jnp.arange(L)[None, :] < img_lengths[:, None])[..., None]   # (B, L, 1)
      img = jnp.where(valid, img, 0)  # padding never enters the network, whatever it holds (inf, nan, ...)
      img_ids = jnp.where(valid, img_ids, 0)
      kv_len = (T + img_lengths).astype(jnp.int32)
    if kv_cache_mode == "cached":   # the cached reference keys follow the target's
      ref_len = kv_cache.lengths if kv_cache.lengths is not None else jnp.full((img.shape[0],), kv_cache.num_ref_tokens)
      kv_len = (T + L + ref_len).astype(jnp.int32)

    vec = self._vector(timesteps, guidance, y)
    angles = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dims, cfg.theta)
    if cfg.shared_modulation:
      double_mods = (self.double_mod_img(vec), self.double_mod_txt(vec))
      single_mods = self.single_mod(vec)
    else:
      double_mods = single_mods = None
    double_kv, single_kv, ref_len = self._block_kv(kv_cache_mode, num_ref_tokens, kv_cache, img_lengths, L,
                                                   timesteps, guidance, y, ref_fixed_timestep)
    return BlockInputs(self.img_in(img), self.txt_in(txt), vec, angles, kv_len, valid, double_mods, single_mods,
                       double_kv, single_kv, ref_len)

  def _vector(self, timesteps, guidance, y):
    """vec (B, D): the time embedding, plus the guidance and pooled-vector embeddings of models that have them."""
    cfg = self.config
    vec = self.time_in(timestep_embedding(at_least_float32(timesteps) * 1000, cfg.time_channels))
    if self.guidance_in is not None:
      vec = vec + self.guidance_in(timestep_embedding(at_least_float32(guidance) * 1000, cfg.time_channels))
    if self.vector_in is not None:
      vec = vec + self.vector_in(y)
    return vec

  def _block_kv(self, mode, num_ref_tokens, kv_cache, img_lengths, L, timesteps, guidance, y, ref_fixed_timestep):
    """Per stack, `cache slice -> BlockKV | None`; and the valid reference slots (B,) of an extract call (or None)."""
    none = lambda cache: None
    if mode is None:
      return none, none, None
    if mode == "cached":
      n_ref = kv_cache.num_ref_tokens
      cached = lambda cache: BlockKV(n_ref, cache=cache)
      return cached, cached, None
    ref_len = (img_lengths - (L - num_ref_tokens)).astype(jnp.int32)
    # a reference query with no valid key (every slot padding) attends to a padding slot: finite, and unused
    own_len = jnp.maximum(ref_len, 1)
    ref_vec = self._vector(jnp.full_like(timesteps, ref_fixed_timestep), guidance, y)
    double_ref_mods, single_ref_mods = self.double_mod_img(ref_vec), self.single_mod(ref_vec)
    return (lambda cache: BlockKV(num_ref_tokens, own_len, double_ref_mods),
            lambda cache: BlockKV(num_ref_tokens, own_len, single_ref_mods), ref_len)

  def _run(self, stack: nnx.Module | None, carry, step, xs=None):
    """`carry, y = step(block, carry, x)` for every block of a stacked module, scanned or unrolled; `x` is the
    block's slice of `xs` (leading layer axis) or None. Returns (carry, the ys stacked on the layer axis)."""
    if stack is None:
      return carry, None
    graphdef, state = nnx.split(stack)

    def body(carry, layer):
      layer_state, x = layer
      return step(nnx.merge(graphdef, layer_state), carry, x)

    if self.remat != "none":
      # Under scan XLA cannot merge the recomputation with the forward pass across iterations, so CSE prevention
      # would only block optimisations there; unrolled blocks need it.
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
    if self.scan_layers:
      return jax.lax.scan(body, carry, (state, xs))
    depth = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(depth):
      carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
      ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  def _check_kv(self, img, mode, num_ref_tokens, kv_cache, img_lengths):
    """Validates the arguments of the reference K/V modes (static, so at trace time)."""
    cfg = self.config
    problems = []
    if mode not in (None, *KV_MODES):
      raise ValueError(f"kv_cache_mode={mode!r}; expected None, 'extract' or 'cached'")
    if mode is not None and not cfg.shared_modulation:
      problems.append("the reference K/V cache needs a FLUX.2 model (shared modulation)")
    if mode == "extract" and not 1 <= num_ref_tokens < img.shape[1]:
      problems.append(f"num_ref_tokens={num_ref_tokens}: extracting needs 1 <= num_ref_tokens < "
                      f"{img.shape[1]} (the image tokens, target first)")
    if mode != "extract" and num_ref_tokens:
      problems.append(f"num_ref_tokens={num_ref_tokens} is only read when extracting")
    if mode == "cached":
      if kv_cache is None:
        problems.append("kv_cache_mode='cached' needs the kv_cache of an extract call")
      else:
        B, H, Dh = img.shape[0], cfg.num_heads, cfg.head_dim
        for name, kv, depth in (("double", kv_cache.double, cfg.depth_double),
                                ("single", kv_cache.single, cfg.depth_single)):
          shapes = None if kv is None else [tuple(a.shape) for a in kv]
          want = [(depth, B, kv_cache.num_ref_tokens, H, Dh)] * 2 if depth else None
          if shapes != want:
            problems.append(f"kv_cache.{name} has shapes {shapes}, expected {want}")
        if kv_cache.lengths is not None and tuple(kv_cache.lengths.shape) != (B,):
          problems.append(f"kv_cache.lengths has shape {tuple(kv_cache.lengths.shape)}, expected ({B},)")
      if img_lengths is not None:
        problems.append("img_lengths is not read when cached (img is the target alone; the cache holds the "
                        "reference lengths)")
    elif kv_cache is not None:
      problems.append(f"kv_cache given with kv_cache_mode={mode!r}; it is read only when 'cached'")
    if problems:
      raise ValueError("MMDiT reference K/V: " + "; ".join(problems))

  def _check_inputs(self, img, txt, timesteps, img_ids, txt_ids, y, guidance, img_lengths):
    """Validates shapes (static, so at trace time); returns ids broadcast to (B, L|T, n_axes)."""
    cfg = self.config
    problems = []

    def expect(name, arr, shape):
      if arr is None:
        problems.append(f"{name} is required (expected shape {shape})")
      elif tuple(arr.shape) != tuple(shape):
        problems.append(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")

    if img.ndim != 3 or txt.ndim != 3:
      raise ValueError(f"img and txt must be (B, L, C) and (B, T, C); got {img.shape} and {txt.shape}")
    B, L, T = img.shape[0], img.shape[1], txt.shape[1]
    expect("img", img, (B, L, cfg.in_channels))
    expect("txt", txt, (B, T, cfg.context_dim))
    expect("timesteps", timesteps, (B,))
    for name, ids, n in (("img_ids", img_ids, L), ("txt_ids", txt_ids, T)):
      if ids is None or tuple(ids.shape) not in ((n, cfg.n_axes), (B, n, cfg.n_axes)):
        problems.append(f"{name} has shape {None if ids is None else tuple(ids.shape)}, expected "
                        f"({n}, {cfg.n_axes}) or ({B}, {n}, {cfg.n_axes})")
    if cfg.pooled_dim:
      expect("y", y, (B, cfg.pooled_dim))
    elif y is not None:
      problems.append("y was given but this model has no pooled-vector embedder (pooled_dim=0)")
    if cfg.guidance_embed:
      expect("guidance", guidance, (B,))
    elif guidance is not None:
      problems.append("guidance was given but this model has no guidance embedder (guidance_embed=False)")
    if img_lengths is not None:
      expect("img_lengths", img_lengths, (B,))
      if not jnp.issubdtype(img_lengths.dtype, jnp.integer):
        problems.append(f"img_lengths must be integer, got {img_lengths.dtype}")
    if problems:
      raise ValueError("MMDiT inputs: " + "; ".join(problems))
    img_ids = jnp.broadcast_to(img_ids, (B, L, cfg.n_axes))
    txt_ids = jnp.broadcast_to(txt_ids, (B, T, cfg.n_axes))
    return img_ids, txt_ids


def count_params(config: MMDiTConfig) -> int:
  """Exact number of parameters of `config`, computed abstractly (no weights are allocated)."""
  abstract = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
