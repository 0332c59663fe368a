"""Flow matching on the target tokens with clean, randomly thinned references.

Per step the host draws one keep ratio of the bucket ladder (`keep_ratio`), whose rung is a static shape, so the
step compiles once per rung; inside the step every example and every reference drops its own random tokens (the
`random` strategy's scores, gathered by `sparse.pack_references`), ids gathered with the tokens. `x_t = (1 - t) x0 +
t eps`, the model predicts `eps - x0`, the loss is the mean squared error over the target tokens only. The step's
random draws (t, eps, drop scores) are made per example for the whole batch (`draw_noise`), so micro-batching
changes nothing. A model whose config says `reference_attention="kv"` trains the function it samples with: the
reference K/V extract call (references modulated at the fixed timestep and attending to themselves only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.model.positions import text_ids
from sparse_context_jax.sampling.schedule import flux1_mu
from sparse_context_jax.sparse import BucketLadder, Rung, pack_references, with_target
from sparse_context_jax.sparse.scores import random_scores


@functools.lru_cache(maxsize=None)
def _ladder(ratios: tuple[float, ...]) -> BucketLadder:
  return BucketLadder(ratios)


def ladder(objective) -> BucketLadder:
  """The objective's bucket ladder (one object per ratios: validation, the loop and every step share it)."""
  return _ladder(tuple(float(r) for r in objective.ladder))


def keep_ratio(objective, seed: int, step: int) -> float:
  """The keep ratio of `step`: a pure function of (seed, step), so a resumed run draws the same ones.

  With probability `dense_prob` 1 (dense); else `ladder`: a rung in [keep_low, keep_high] uniformly, or
  `uniform`: U(keep_low, keep_high) rounded up to the next rung.
  """
  ratios = ladder(objective).ratios
  rng = np.random.default_rng([seed, 0x6b656570, step])   # "keep"
  if rng.random() < objective.dense_prob:
    return 1.0
  if objective.keep_dist == "ladder":
    rungs = [r for r in ratios if objective.keep_low - 1e-9 <= r <= objective.keep_high + 1e-9]
    if not rungs:   # a window between two rungs: its upper rung
      rungs = [next(r for r in ratios if r >= objective.keep_high - 1e-9)]
    return float(rungs[rng.integers(len(rungs))])
  r = rng.uniform(objective.keep_low, objective.keep_high)
  return float(next(x for x in ratios if x >= r - 1e-9))


def step_rung(objective, seed: int, step: int, grid: tuple[int, int], refs: int) -> Rung:
  """The rung of `step` for `refs` reference slots of token grid `grid` (the target's: one bucket)."""
  return ladder(objective).at(keep_ratio(objective, seed, step), (grid,) * refs)


def sample_timesteps(key: jax.Array, batch: int, mean: float, std: float, mu: float | None) -> jax.Array:
  """(batch,) float32 t in (0, 1): sigmoid of N(mean, std), then FLUX's shift exp(mu) / (exp(mu) + 1/t - 1)."""
  t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
  if mu is not None:
    t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
  return t


def draw_noise(objective, key: jax.Array, batch: dict, grid: tuple[int, int]) -> dict:
  """Every random draw of a step, per example, for the whole batch: t (B,), eps (B, N, C) float32 and the scores
  by which each reference drops its tokens, drop_scores (B, R, M) (the `random` strategy's).

  Drawn before the batch is split into micro-batches (and with the batch-global shapes, so also independent of
  the sharding): an example draws the same values whatever `train.grad_accum` is.
  """
  B, N, C = batch["target"].shape
  R = batch["refs"].shape[1]
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  mu = flux1_mu(N) if objective.shift else None
  scores = [random_scores(k, B, grid) for k in jax.random.split(k_drop, R)]
  return {"t": sample_timesteps(k_t, B, objective.logit_mean, objective.logit_std, mu),
          "eps": jax.random.normal(k_eps, (B, N, C), jnp.float32),
          "drop_scores": jnp.stack(scores, axis=1)}


def loss_sums(model, objective, batch: dict, rung: Rung) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted per-example losses, sum of weights) over one (micro-)batch; deterministic given the batch.

  batch: a model batch (`train.batches`: target, refs, ref_valid, txt, y, weight) with the step's random draws of
  these examples (`draw_noise`): t (B,), eps (B, N, C), drop_scores (B, R, N_ref). rung: the step's rung (one grid
  for the target and every reference).
  """
  cfg = model.config
  x0 = batch["target"].astype(jnp.float32)
  B, N, _ = x0.shape
  R = batch["refs"].shape[1]
  t, eps = batch["t"], batch["eps"]
  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
  # Absent reference slots get a zero budget: all their slots become padding.
  budgets = jnp.where(batch["ref_valid"], jnp.asarray(rung.capacities), 0).astype(jnp.int32)
  tokens, ids, kept = pack_references(cfg, [batch["refs"][:, i].astype(jnp.float32) for i in range(R)],
                                      [batch["drop_scores"][:, i] for i in range(R)], budgets, rung)
  img, img_ids, lengths = with_target(cfg, x_t, rung.grids[0], tokens, ids, kept)
  extra = {}
  if cfg.pooled_dim:
    extra["y"] = batch["y"]
  if cfg.guidance_embed:
    extra["guidance"] = jnp.full((B,), objective.guidance, jnp.float32)
  T = batch["txt"].shape[1]
  if cfg.reference_attention == "kv" and rung.slots:
    # the KV model's own function: references at the fixed timestep, attending to themselves (the first step)
    extra.update(kv_cache_mode="extract", num_ref_tokens=rung.slots)
  out = model(img, batch["txt"], t, img_ids, jnp.asarray(text_ids(cfg, T)), img_lengths=lengths, **extra)
  out = out[0] if isinstance(out, tuple) else out
  err = jnp.mean(jnp.square(out[:, :N].astype(jnp.float32) - (eps - x0)), axis=(1, 2))
  w = batch["weight"].astype(jnp.float32)
  return jnp.sum(err * w), jnp.sum(w)
