"""Multi-axis rotary position embedding of FLUX (EmbedND / FluxPosEmbed / Flux2PosEmbed).

For ids (..., S, n_axes) and per-axis dims d_a (summing to the head dim), axis a contributes the angles
`pos_a * theta ** (-2 j / d_a)`, j < d_a / 2; the per-axis tables are concatenated along the head dim and rotate
interleaved pairs (2i, 2i+1) of q and k.

The references compute the angles in float64. In float32, `pos * omega` loses about |angle| * 6e-8 rad (3e-5 rad
at a text position of 511), so the angles come from `numerics.sinusoid_angles`: float32 arithmetic, float64
accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.model.numerics import at_least_float32, sinusoid_angles


def rope_angles(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> jax.Array:
  """ids (..., S, n_axes) -> angles (..., S, head_dim / 2), float32 (float64 for float64 ids), in [-pi, pi]."""
  if ids.shape[-1] != len(axes_dims):
    raise ValueError(f"position ids have {ids.shape[-1]} axes, the model expects {len(axes_dims)} {tuple(axes_dims)}")
  turns = np.concatenate([
      theta ** (-np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d) / (2 * np.pi) for d in axes_dims])
  axis_of_freq = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
  return sinusoid_angles(ids[..., axis_of_freq], turns)                  # (..., S, Dh/2)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x (B, S, H, Dh) by angles (B, S, Dh/2); computes in at least float32."""
  xw = at_least_float32(x)
  xw = xw.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x0, x1 = xw[..., 0], xw[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape)
