"""Multi-axis rotary position embedding of FLUX (EmbedND / FluxPosEmbed / Flux2PosEmbed).

For ids (..., S, n_axes) and per-axis dims d_a (summing to the head dim), axis a contributes the angles
`pos_a * theta ** (-2 j / d_a)`, j < d_a / 2; the per-axis tables are concatenated along the head dim and rotate
interleaved pairs (2i, 2i+1) of q and k.

The references compute the angles in float64. In float32, `pos * omega` loses about |angle| * 6e-8 rad (3e-5 rad
at a text position of 511). We keep float32-only code (TPU-friendly) and still match float64: the frequency is
split into turns `f = f_hi + f_lo` with `f_hi` holding 11 significant bits, so `pos * f_hi` is exact for integer
positions below 2**13 and its fractional part is exact too; the angle is then reduced to one turn before `2 pi`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _turns_per_position(axes_dims: Sequence[int], theta: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-frequency turns (omega / 2 pi) as an exact (hi, lo) float32 split, each (sum(axes_dims) / 2,)."""
  turns = np.concatenate([
      theta ** (-np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d) / (2 * np.pi) for d in axes_dims])
  mantissa, exponent = np.frexp(turns)
  hi = np.ldexp(np.round(mantissa * 2.0**11), exponent - 11)  # 11 significant bits
  lo = turns - hi
  return hi.astype(np.float32), lo.astype(np.float32)


def rope_angles(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> jax.Array:
  """ids (..., S, n_axes) -> angles (..., S, head_dim / 2) in float32, each in [0, 2 pi)."""
  if ids.shape[-1] != len(axes_dims):
    raise ValueError(f"position ids have {ids.shape[-1]} axes, the model expects {len(axes_dims)} {tuple(axes_dims)}")
  hi, lo = _turns_per_position(axes_dims, theta)
  axis_of_freq = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
  pos = ids.astype(jnp.float32)[..., axis_of_freq]              # (..., S, Dh/2)
  coarse = pos * hi
  frac = (coarse - jnp.floor(coarse)) + pos * lo
  return (2 * np.pi) * (frac - jnp.floor(frac))


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x (B, S, H, Dh) by angles (B, S, Dh/2); computes in float32."""
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x0, x1 = x32[..., 0], x32[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape)
