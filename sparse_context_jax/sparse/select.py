"""Budgets and top-k selection at a static capacity. Pure JAX, jittable.

A reference of M tokens is reduced to `capacity` slots (static: one compiled shape per bucket); the first
`budget[b]` slots of example b hold its kept tokens in raster order, the rest are invalid (padding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def fixed_budget(keep: float, tokens: int) -> int:
  """Tokens kept of a reference of `tokens` tokens at keep ratio `keep`: ceil(keep * M)."""
  return min(tokens, max(1, math.ceil(keep * tokens - 1e-9)))


def adaptive_budget(mass: jax.Array, tau: float | jax.Array, k_min: int, k_max: int) -> jax.Array:
  """Per example, the smallest k whose top-k share of `mass` reaches `tau`, clipped to [k_min, k_max].

  mass (B, M) non-negative (negative values count as 0; all-zero means uniform) -> (B,) int32. The budget grows
  monotonically with `tau`; `tau = 1` keeps every token (before clipping).
  """
  m = mass.shape[-1]
  mass = jnp.maximum(mass.astype(jnp.float32), 0)
  total = jnp.sum(mass, axis=-1, keepdims=True)
  share = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1), 1.0 / m)
  cumulative = jnp.cumsum(-jnp.sort(-share, axis=-1), axis=-1)
  # Count the prefixes still short of tau (with float32 slack); k is one more.
  k = jnp.where(tau >= 1, m, jnp.sum(cumulative < tau - 1e-6, axis=-1) + 1)   # tau may be traced
  return jnp.clip(k, k_min, k_max).astype(jnp.int32)


def top_k(scores: jax.Array, budget: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """The `budget[b]` best tokens (ties to the lower raster index), in raster order, in `capacity` slots.

  scores (B, M), budget (B,) -> indices (B, capacity) int32 and valid (B, capacity) bool; invalid slots come last
  and repeat the next-best tokens (their contents are masked anyway).
  """
  B, m = scores.shape
  if not 0 < capacity <= m:
    raise ValueError(f"capacity {capacity} must be in [1, {m}] (the reference's token count)")
  iota = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (B, m))
  best = jax.lax.sort((-scores.astype(jnp.float32), iota), dimension=1, num_keys=2)[1][:, :capacity]
  valid = jnp.arange(capacity)[None, :] < budget[:, None]
  key = jnp.sort(jnp.where(valid, best, m + best), axis=1)   # valid ones first, each group in raster order
  return jnp.where(key >= m, key - m, key).astype(jnp.int32), valid
