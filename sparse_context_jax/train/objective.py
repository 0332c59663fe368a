"""Flow matching on the target tokens with clean, randomly thinned references (method.md section 2.4).

Per step the host draws one keep ratio (snapped up to the bucket ladder, so a rung is a static shape and the
step compiles once per rung); inside the step every example and every reference drops its own random tokens
through the sparse packer (`sparse/pack.py`), ids gathered with the tokens. `x_t = (1 - t) x0 + t eps`, the model
predicts `eps - x0`, the loss is the mean squared error over the target tokens only. The step's random draws
(t, eps, drop scores) are made per example for the whole batch (`draw_noise`), so micro-batching changes nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.model.positions import text_ids
from sparse_context_jax.sampling.schedule import flux1_mu
from sparse_context_jax.sparse.buckets import BucketLadder
from sparse_context_jax.sparse.pack import SparsePacker
from sparse_context_jax.sparse.select import fixed_budget


def keep_ratio(objective, seed: int, step: int) -> float:
  """The keep ratio of `step`: a pure function of (seed, step), so a resumed run draws the same ones.

  With probability `dense_prob` 1 (dense); else `ladder`: a rung in [keep_low, keep_high] uniformly, or
  `uniform`: U(keep_low, keep_high) rounded up to the next rung.
  """
  ladder = BucketLadder(tuple(objective.ladder))
  rng = np.random.default_rng([seed, 0x6b656570, step])   # "keep"
  if rng.random() < objective.dense_prob:
    return 1.0
  if objective.keep_dist == "ladder":
    rungs = [r for r in ladder.ratios if objective.keep_low - 1e-9 <= r <= objective.keep_high + 1e-9]
    if not rungs:   # a window between two rungs: its upper rung
      rungs = [next(r for r in ladder.ratios if r >= objective.keep_high - 1e-9)]
    return float(rungs[rng.integers(len(rungs))])
  r = rng.uniform(objective.keep_low, objective.keep_high)
  return float(next(x for x in ladder.ratios if x >= r - 1e-9))


def sample_timesteps(key: jax.Array, batch: int, mean: float, std: float, mu: float | None) -> jax.Array:
  """(batch,) float32 t in (0, 1): sigmoid of N(mean, std), then FLUX's shift exp(mu) / (exp(mu) + 1/t - 1)."""
  t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
  if mu is not None:
    t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
  return t


def draw_noise(objective, key: jax.Array, batch: dict) -> dict:
  """Every random draw of a step, per example, for the whole batch: t (B,), eps (B, N, C) float32 and the scores
  by which each reference drops its tokens, drop_scores (B, R, M) (uniform: the packer's `random` strategy).

  Drawn before the batch is split into micro-batches (and with the batch-global shapes, so also independent of
  the sharding): an example draws the same values whatever `train.grad_accum` is.
  """
  B, N, C = batch["target"].shape
  R, M = batch["refs"].shape[1], batch["refs"].shape[2]
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  mu = flux1_mu(N) if objective.shift else None
  return {"t": sample_timesteps(k_t, B, objective.logit_mean, objective.logit_std, mu),
          "eps": jax.random.normal(k_eps, (B, N, C), jnp.float32),
          "drop_scores": jax.random.uniform(k_drop, (B, R, M), jnp.float32)}


def loss_sums(model, packer: SparsePacker, objective, batch: dict, ratio: float,
              grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted per-example losses, sum of weights) over one (micro-)batch; deterministic given the batch.

  batch: target (B, N, C) clean target tokens; refs (B, R, N_ref, C) clean reference tokens; ref_valid (B, R)
  bool; txt (B, T, D); y (B, P) (FLUX.1 only); weight (B,) float (0 for the pipeline's padding examples); and the
  step's random draws of these examples (`draw_noise`): t (B,), eps (B, N, C), drop_scores (B, R, N_ref).
  grid: (h, w) token grid of the target and of every reference (the pipeline resizes them to one bucket).
  """
  cfg = model.config
  x0 = batch["target"].astype(jnp.float32)
  B, N, _ = x0.shape
  R, M = batch["refs"].shape[1], batch["refs"].shape[2]
  t, eps = batch["t"], batch["eps"]
  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
  # Absent reference slots get a zero budget: all their slots become padding.
  budgets = jnp.where(batch["ref_valid"], fixed_budget(ratio, M), 0).astype(jnp.int32)
  refs = [{"latents": batch["refs"][:, i].astype(jnp.float32)} for i in range(R)]
  # The packer's jittable core, traced into the train step (one program per rung); budgets arrive computed and
  # the drop scores drawn, so no key is needed.
  img, img_ids, lengths = packer.pack_traced(x_t, refs, budgets, None, target_grid=grid,
                                             capacities=(fixed_budget(ratio, M),) * R, grids=(grid,) * R,
                                             scores=[batch["drop_scores"][:, i] for i in range(R)])
  extra = {}
  if cfg.pooled_dim:
    extra["y"] = batch["y"]
  if cfg.guidance_embed:
    extra["guidance"] = jnp.full((B,), objective.guidance, jnp.float32)
  T = batch["txt"].shape[1]
  out = model(img, batch["txt"], t, img_ids, jnp.asarray(text_ids(cfg, T)), img_lengths=lengths, **extra)
  err = jnp.mean(jnp.square(out[:, :N].astype(jnp.float32) - (eps - x0)), axis=(1, 2))
  w = batch["weight"].astype(jnp.float32)
  return jnp.sum(err * w), jnp.sum(w)
