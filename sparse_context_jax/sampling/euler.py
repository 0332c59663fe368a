"""Euler flow-matching sampling with the whole denoising loop inside one compiled program.

`x_t = (1 - t) x0 + t noise`; the model predicts `v = noise - x0`; each step `x <- x + (t_next - t) v` in float32.
The reference tokens (packed, possibly sparse and padded) are prepared once per job and re-fed unchanged at every
step after the current target latents; only the target tokens are updated. True CFG runs the positive and the
negative prompt in one batched call. In the reference K/V loop (FLUX.2 klein KV) the references run once, at the
first step, and later steps reuse their cached keys and values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Conditioning:
  """Everything but the target latents, constant over the loop.

  refs: (B, L - N, C) reference tokens (and padding) that follow the N target tokens; may have L - N = 0.
  img_ids: (B, L, n_axes) or (L, n_axes); img_lengths: (B,) or None.
  txt: (B, T, D_ctx), txt_ids, y (B, pooled) for FLUX.1, guidance (B,) for guidance-embedded models.
  neg_txt / neg_y: the negative prompt for true CFG (with cfg_scale), same shapes as txt / y.
  """

  refs: jax.Array
  img_ids: jax.Array
  txt: jax.Array
  txt_ids: jax.Array
  img_lengths: jax.Array | None = None
  y: jax.Array | None = None
  guidance: jax.Array | None = None
  neg_txt: jax.Array | None = None
  neg_y: jax.Array | None = None


jax.tree_util.register_dataclass(
    Conditioning, data_fields=[f.name for f in dataclasses.fields(Conditioning)], meta_fields=[])


def _double(a):
  return None if a is None else jnp.concatenate([a, a], axis=0)


def _call(model, img, t, img_ids, img_lengths, cond: Conditioning, cfg_scale, **kv):
  """The model on img (B, L, C) at sigma t, with the positive and the negative prompt in one batch for true CFG
  (2B rows); `kv` are the reference K/V arguments. Returns what the model returns."""
  timesteps = jnp.full((img.shape[0],), t, jnp.float32)
  if cfg_scale is None:
    return model(img, cond.txt, timesteps, img_ids, cond.txt_ids, y=cond.y, guidance=cond.guidance,
                 img_lengths=img_lengths, **kv)
  ids = lambda a: a if a.ndim == 2 else _double(a)
  return model(_double(img), jnp.concatenate([cond.txt, cond.neg_txt], axis=0), _double(timesteps), ids(img_ids),
               ids(cond.txt_ids), y=None if cond.y is None else jnp.concatenate([cond.y, cond.neg_y], axis=0),
               guidance=_double(cond.guidance), img_lengths=_double(img_lengths), **kv)


def _guided(out, n: int, cfg_scale):
  """The velocity (B, N, C) float32 of the target rows of a model output, combined for true CFG."""
  v = out[:, :n].astype(jnp.float32)
  if cfg_scale is None:
    return v
  pos, neg = jnp.split(v, 2, axis=0)
  scale = jnp.asarray(cfg_scale, jnp.float32)
  scale = scale.reshape(-1, 1, 1) if scale.ndim else scale   # one scale, or one per example (B,)
  return neg + scale * (pos - neg)


def _velocity(model, x, t, cond: Conditioning, cfg_scale: float | None):
  """v(x, t) on the target tokens, (B, N, C), with true CFG when `cfg_scale` is set."""
  img = jnp.concatenate([x.astype(cond.refs.dtype), cond.refs], axis=1)
  return _guided(_call(model, img, t, cond.img_ids, cond.img_lengths, cond, cfg_scale), x.shape[1], cfg_scale)


def denoise(model, noise: jax.Array, sigmas: jax.Array, cond: Conditioning, cfg_scale: float | None = None, *,
            reference_kv: bool | None = None, ref_fixed_timestep: float = 0.0):
  """Runs every Euler step: noise (B, N, C) at sigma 1 -> latents (B, N, C) float32 at sigma 0.

  `model` is an MMDiT (or its merged form inside jit); `sigmas` (steps + 1,) from `schedule.sigmas`.
  `reference_kv` (default: the model config's `reference_attention == "kv"`) runs the klein-KV loop: the first step
  extracts the references' K/V (on the kept tokens of a sparse bucket), every later step runs text and target
  alone with that cache; the whole loop stays one program. Without reference slots it is the plain loop.
  """
  if cfg_scale is not None and cond.neg_txt is None:
    raise ValueError("true CFG (cfg_scale) needs the negative prompt (neg_txt)")
  if reference_kv is None:
    reference_kv = model.config.reference_attention == "kv"
  if reference_kv and cond.refs.shape[1]:
    return _denoise_kv(model, noise, sigmas, cond, cfg_scale, ref_fixed_timestep)

  def step(x, i):
    v = _velocity(model, x, sigmas[i], cond, cfg_scale)
    return x + (sigmas[i + 1] - sigmas[i]) * v, None

  return jax.lax.scan(step, noise.astype(jnp.float32), jnp.arange(sigmas.shape[0] - 1))[0]


def _denoise_kv(model, noise, sigmas, cond: Conditioning, cfg_scale, ref_fixed_timestep: float):
  """The Euler loop of klein KV: extract at the first step, cached steps after it."""
  n, dtype = noise.shape[1], cond.refs.dtype
  x = noise.astype(jnp.float32)
  img = jnp.concatenate([x.astype(dtype), cond.refs], axis=1)
  out, cache = _call(model, img, sigmas[0], cond.img_ids, cond.img_lengths, cond, cfg_scale,
                     kv_cache_mode="extract", num_ref_tokens=cond.refs.shape[1], ref_fixed_timestep=ref_fixed_timestep)
  x = x + (sigmas[1] - sigmas[0]) * _guided(out, n, cfg_scale)
  target_ids = cond.img_ids[..., :n, :]

  def step(x, i):
    out = _call(model, x.astype(dtype), sigmas[i], target_ids, None, cond, cfg_scale, kv_cache=cache,
                kv_cache_mode="cached")
    return x + (sigmas[i + 1] - sigmas[i]) * _guided(out, n, cfg_scale), None

  return jax.lax.scan(step, x, jnp.arange(1, sigmas.shape[0] - 1))[0]
