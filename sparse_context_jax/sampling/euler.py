"""Euler flow-matching sampling with the whole denoising loop inside one compiled program.

`x_t = (1 - t) x0 + t noise`; the model predicts `v = noise - x0`; each step `x <- x + (t_next - t) v` in float32.
The reference tokens (packed, possibly sparse and padded) are prepared once per job and re-fed unchanged at every
step after the current target latents; only the target tokens are updated. True CFG runs the positive and the
negative prompt in one batched call.
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


def _velocity(model, x, t, cond: Conditioning, cfg_scale: float | None):
  """v(x, t) on the target tokens, (B, N, C), with true CFG when `cfg_scale` is set."""
  n = x.shape[1]
  img = jnp.concatenate([x.astype(cond.refs.dtype), cond.refs], axis=1)
  timesteps = jnp.full((x.shape[0],), t, jnp.float32)
  if cfg_scale is None:
    out = model(img, cond.txt, timesteps, cond.img_ids, cond.txt_ids, y=cond.y, guidance=cond.guidance,
                img_lengths=cond.img_lengths)
    return out[:, :n].astype(jnp.float32)
  ids = cond.img_ids if cond.img_ids.ndim == 2 else _double(cond.img_ids)
  txt_ids = cond.txt_ids if cond.txt_ids.ndim == 2 else _double(cond.txt_ids)
  out = model(_double(img), jnp.concatenate([cond.txt, cond.neg_txt], axis=0), _double(timesteps), ids, txt_ids,
              y=None if cond.y is None else jnp.concatenate([cond.y, cond.neg_y], axis=0),
              guidance=_double(cond.guidance), img_lengths=_double(cond.img_lengths))
  pos, neg = jnp.split(out[:, :n].astype(jnp.float32), 2, axis=0)
  scale = jnp.asarray(cfg_scale, jnp.float32)
  scale = scale.reshape(-1, 1, 1) if scale.ndim else scale   # one scale, or one per example (B,)
  return neg + scale * (pos - neg)


def denoise(model, noise: jax.Array, sigmas: jax.Array, cond: Conditioning, cfg_scale: float | None = None):
  """Runs every Euler step: noise (B, N, C) at sigma 1 -> latents (B, N, C) float32 at sigma 0.

  `model` is an MMDiT (or its merged form inside jit); `sigmas` (steps + 1,) from `schedule.sigmas`.
  """
  if cfg_scale is not None and cond.neg_txt is None:
    raise ValueError("true CFG (cfg_scale) needs the negative prompt (neg_txt)")

  def step(x, i):
    v = _velocity(model, x, sigmas[i], cond, cfg_scale)
    return x + (sigmas[i + 1] - sigmas[i]) * v, None

  return jax.lax.scan(step, noise.astype(jnp.float32), jnp.arange(sigmas.shape[0] - 1))[0]
