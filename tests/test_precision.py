"""Precision: the bfloat16 compute path, and sinusoids (RoPE, timestep / guidance embeddings) as accurate as float64."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from conftest import inputs, jitted
from sparse_context_jax.model.layers import timestep_embedding
from sparse_context_jax.model.numerics import sinusoid_angles
from sparse_context_jax.model.rope import apply_rope, rope_angles

# Measured on the tiny models (random weights, 4 blocks): 1.0e-2 to 1.1e-2 of max |out| with float32 or bfloat16
# parameters. (diffusers cast to bfloat16 deviates by 0.3-0.7 on the same models: it embeds t x 1000 in bfloat16.)
BF16_BOUND = 3e-2


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["flux1-kontext", "flux2-dev-3ref"])
def test_bfloat16_compute_stays_close_to_float32(name, param_dtype):
  x = inputs(name)
  out32 = jitted(name)(x)
  out16 = jitted(name, dtype=jnp.bfloat16, param_dtype=param_dtype)(x)
  assert out16.dtype == jnp.bfloat16
  err = ref.rel_err(out16.astype(np.float32), out32)
  print(f"{name}, {np.dtype(param_dtype).name} parameters: bfloat16 relative error {err:.2e}")
  assert np.all(np.isfinite(out16.astype(np.float32)))
  assert 1e-4 < err <= BF16_BOUND   # it is bfloat16 (not silently float32), and it is close


@pytest.mark.parametrize("axes, theta", [((16, 56, 56), 10000.0), ((32, 32, 32, 32), 2000.0)])
def test_rope_angles_match_float64(axes, theta):
  rng = np.random.default_rng(0)
  ids = np.concatenate([rng.integers(0, 4096, (512, len(axes))), np.full((1, len(axes)), 4095)]).astype(np.float32)
  omega = np.concatenate([theta ** (-np.arange(0, d, 2, dtype=np.float64) / d) for d in axes])
  axis = np.repeat(np.arange(len(axes)), [d // 2 for d in axes])
  exact = ids.astype(np.float64)[:, axis] * omega
  got = np.asarray(rope_angles(jnp.asarray(ids), axes, theta), np.float64)
  err = np.abs(np.angle(np.exp(1j * (got - exact))))
  naive = np.asarray(jnp.asarray(ids)[:, axis] * jnp.asarray(omega, jnp.float32), np.float64)
  naive_err = np.abs(np.angle(np.exp(1j * (naive - exact))))
  print(f"max angle error {err.max():.1e} rad (plain float32: {naive_err.max():.1e})")
  assert err.max() <= 1e-6 < naive_err.max()


def test_apply_rope_rotates_interleaved_pairs():
  x = np.arange(2 * 3 * 1 * 4, dtype=np.float32).reshape(2, 3, 1, 4)
  angles = np.full((2, 3, 2), np.pi / 2, np.float32)
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(angles)))
  expected = np.stack([-x[..., 1], x[..., 0], -x[..., 3], x[..., 2]], axis=-1)   # (x0, x1) -> (-x1, x0)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_timestep_embedding_matches_float64():
  """Timesteps x 1000 in [0, 1000] and guidance x 1000 up to 10000: within 1e-6 of the exact embedding, where plain
  float32 (the references' arithmetic) is off by up to ~1e-3."""
  t = np.concatenate([np.linspace(0, 1, 1001), np.linspace(1, 10, 901)]).astype(np.float32) * np.float32(1000)
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = t.astype(np.float64)[:, None] * freqs
  exact = np.concatenate([np.cos(args), np.sin(args)], -1)
  got = np.asarray(timestep_embedding(jnp.asarray(t), 2 * half), np.float64)
  args32 = jnp.asarray(t)[:, None] * jnp.asarray(freqs, jnp.float32)
  naive = np.asarray(jnp.concatenate([jnp.cos(args32), jnp.sin(args32)], -1), np.float64)
  err, naive_err = np.abs(got - exact).max(), np.abs(naive - exact).max()
  print(f"max embedding error {err:.1e} (plain float32: {naive_err:.1e})")
  assert err <= 1e-6 < 1e-4 < naive_err


def test_sinusoid_angles_in_float64_are_exact():
  rng = np.random.default_rng(0)
  pos = np.concatenate([rng.uniform(0, 10000, 500), rng.integers(0, 1 << 20, 500)])
  turns = 10000.0 ** (-np.arange(64) / 64) / (2 * np.pi)
  product = pos.astype(np.longdouble)[:, None] * turns.astype(np.longdouble)   # 64-bit mantissa: ~1e-14 turns
  exact = (2 * np.pi * (np.remainder(product + 0.5, 1) - 0.5)).astype(np.float64)
  with jax.enable_x64(True):
    got = np.asarray(sinusoid_angles(jnp.asarray(pos)[:, None], turns))
  assert got.dtype == np.float64
  assert np.abs(np.angle(np.exp(1j * (got - exact)))).max() <= 1e-11
