"""Flow-matching noise schedules of FLUX.1 and FLUX.2.

Sigmas run from 1 (pure noise) down to 0: `linspace(1, 1/N, N)`, shifted by `exp(mu) / (exp(mu) + (1/t - 1))`,
then a final 0. The shift `mu` depends on the target token count N (references excluded): linear in N for
FLUX.1 dev / Kontext, none for schnell, FLUX.2's empirical fit in N and the step count. Computed like diffusers'
`FlowMatchEulerDiscreteScheduler` (float32 after the float64 linspace) so the grids agree to the ulp.
"""

from __future__ import annotations

import math

import numpy as np

from sparse_context_jax.model.config import MMDiTConfig


def flux1_mu(n_tokens: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5,
             max_shift: float = 1.15) -> float:
  """FLUX.1 dev / Kontext: mu linear in the target token count (0.5 at 256 tokens, 1.15 at 4096)."""
  m = (max_shift - base_shift) / (max_len - base_len)
  return n_tokens * m + (base_shift - m * base_len)


def flux2_mu(n_tokens: int, steps: int) -> float:
  """FLUX.2's empirical mu, a function of the target token count and the number of steps."""
  a1, b1 = 8.73809524e-05, 1.89833333
  a2, b2 = 0.00016927, 0.45666666
  if n_tokens > 4300:
    return a2 * n_tokens + b2
  m_200, m_10 = a2 * n_tokens + b2, a1 * n_tokens + b1
  a = (m_200 - m_10) / 190.0
  return a * steps + (m_200 - 200.0 * a)


def sigmas(steps: int, mu: float | None) -> np.ndarray:
  """(steps + 1,) float32 noise levels from 1 to 0; `mu=None` leaves the linear grid unshifted."""
  if steps < 1:
    raise ValueError(f"steps={steps}: at least one step is needed")
  s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
  if mu is not None:
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
  return np.append(s.astype(np.float32), np.float32(0.0))


def schedule_for(cfg: MMDiTConfig, n_tokens: int, steps: int, shift: bool | None = None) -> np.ndarray:
  """The released pipelines' schedule for a model: FLUX.2 empirical mu; FLUX.1 with a guidance embedder (dev,
  Kontext) linear mu; FLUX.1 without one (schnell) unshifted. `shift` overrides whether to shift at all."""
  if shift is None:
    shift = cfg.family == "flux2" or cfg.guidance_embed
  if not shift:
    return sigmas(steps, None)
  return sigmas(steps, flux2_mu(n_tokens, steps) if cfg.family == "flux2" else flux1_mu(n_tokens))
