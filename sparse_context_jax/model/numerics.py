"""Arithmetic that must not depend on the compute dtype or on the machine: statistics precision and sinusoid angles.

Sinusoids (RoPE and the timestep / guidance embeddings) need `pos * omega` far beyond float32's reach: a guidance of
5 embeds at 5000 rad, where one float32 ulp is 4.9e-4 rad. The exact angle is what this model computes, on every
backend, in float32 arithmetic: position and frequency (in turns, omega / 2 pi) are each split into a high part of
half the mantissa and the rest, so the high product is exact and so is its fractional part; the three cross terms
are small and their rounding is ~1e-7 rad. The angle is reduced to one turn before `2 pi`, so the sine and cosine
see arguments in [-pi, pi] (accurate on every backend). In float64 (jax x64) the same code is exact to ~1e-15.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or float64 when it already is: the dtype of norm statistics, softmax, RoPE and embeddings."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _low_bits(dtype) -> int:
  """Mantissa bits cleared by the split, so that the product of two high parts is exact in `dtype`."""
  significant = np.finfo(dtype).nmant + 1
  return significant - significant // 2


def _split_host(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
  """float64 constants -> (hi, lo) in `dtype`, hi with half the significant bits of `dtype`, hi + lo ~= x."""
  mantissa, exponent = np.frexp(np.asarray(x, np.float64))
  keep = np.finfo(dtype).nmant + 1 - _low_bits(dtype)
  hi = np.ldexp(np.trunc(mantissa * 2.0**keep), exponent - keep)
  return hi.astype(dtype), (x - hi).astype(dtype)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x -> (hi, lo) with hi = x truncated to half its significant bits (a bit mask, so no compiler can fold it)."""
  uint = {4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
  mask = ~np.array((1 << _low_bits(x.dtype)) - 1, uint)
  hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, uint) & mask, x.dtype)
  return hi, x - hi


def sinusoid_angles(pos: jax.Array, turns: np.ndarray) -> jax.Array:
  """2 pi * (pos * turns mod 1) in [-pi, pi], as accurate as float64 (see the module docstring).

  Args:
    pos: positions (RoPE ids, or timesteps x 1000), broadcastable against `turns`; computed in `at_least_float32`.
    turns: float64 host constants, frequencies in turns per unit position (omega / 2 pi).
  """
  pos = at_least_float32(pos)
  f_hi, f_lo = _split_host(turns, pos.dtype)
  p_hi, p_lo = _split(pos)
  coarse = p_hi * f_hi                                      # exact
  frac = coarse - jnp.round(coarse)                         # exact, in [-1/2, 1/2]
  frac = frac + (p_hi * f_lo + p_lo * f_hi + p_lo * f_lo)
  return (2 * np.pi) * (frac - jnp.round(frac))
