"""What a run learned: targets generated from noise, conditioned on the (dense or sparse) references and the
caption, scored in pixels against the exact ground truth of the synthetic world.

```python
batches = fixed_batches(write_world(config, path, seed=1), config, count=32)   # a held-out world
scores = psnr_scores(state["params"], batches, config, setup.graphdef, keep=0.25, steps=16)
scores["all"], scores["editing"], scores["composition"]                         # mean PSNR in dB
```
`generate` is the pure, jittable core: Euler sampling of the target tokens (sampling/euler.py) with the
references packed by the sparse packer's traced core, random tokens kept at the keep ratio, as in training.
The host functions compile it once per (keep ratio, Euler steps, batch shape), counted by `PROGRAMS.count`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.data.manifest import TASKS
from sparse_context_jax.data.pipeline import make_pipeline
from sparse_context_jax.data.world import psnr
from sparse_context_jax.model.positions import text_ids
from sparse_context_jax.programs import ProgramCache
from sparse_context_jax.sampling.euler import Conditioning, denoise
from sparse_context_jax.sampling.schedule import flux1_mu, sigmas
from sparse_context_jax.sparse.pack import SparsePacker
from sparse_context_jax.sparse.select import fixed_budget
from sparse_context_jax.train import config as C
from sparse_context_jax.train.standin import HashedText, host_batch, pixels_from_tokens


def generate(params, batch: dict, key: jax.Array, sigma: jax.Array, *, graphdef: nnx.GraphDef, ratio: float,
             grid: tuple[int, int], guidance: float = 1.0) -> jax.Array:
  """(B, N, C) float32 target tokens sampled from noise (pure; jit it with graphdef, ratio and grid static).

  params: the model's pure parameter dict (`state["params"]`); batch: `standin.host_batch`'s dict (its `target`
  gives only the shape; `refs`, `ref_valid`, `txt` and `y` condition); key: the noise and the kept tokens (`ratio`
  of each reference's tokens at random, the training distribution; 1.0 keeps them all); sigma: (steps + 1,) noise
  levels from 1 to 0; grid: (h, w) token grid of the target and of every reference.
  """
  model = nnx.merge(graphdef, params)
  cfg = model.config
  B, N, C = batch["target"].shape
  R, M = batch["refs"].shape[1], batch["refs"].shape[2]
  k_noise, k_drop = jax.random.split(key)
  noise = jax.random.normal(k_noise, (B, N, C), jnp.float32)
  capacity = fixed_budget(ratio, M)
  budgets = jnp.where(batch["ref_valid"], capacity, 0).astype(jnp.int32)
  refs = [{"latents": batch["refs"][:, i].astype(jnp.float32)} for i in range(R)]
  # The packer's traced core, as in the train step: [target | kept tokens of every reference | padding].
  img, img_ids, lengths = SparsePacker(cfg).pack_traced(noise, refs, budgets, k_drop, target_grid=grid,
                                                        capacities=(capacity,) * R, grids=(grid,) * R)
  cond = Conditioning(refs=img[:, N:], img_ids=img_ids, txt=batch["txt"],
                      txt_ids=jnp.asarray(text_ids(cfg, batch["txt"].shape[1])), img_lengths=lengths,
                      y=batch["y"] if cfg.pooled_dim else None,
                      guidance=jnp.full((B,), guidance, jnp.float32) if cfg.guidance_embed else None)
  return denoise(model, noise, sigma, cond)


PROGRAMS = ProgramCache(generate, "generate")


def eval_sigmas(config, n_tokens: int, steps: int) -> np.ndarray:
  """The sampling schedule that matches training's timesteps: shifted by FLUX.1's mu when `objective.shift`."""
  return sigmas(steps, flux1_mu(n_tokens) if config.objective.shift else None)


def write_world(config, path: str, seed: int, count: int | None = None) -> str:
  """The synthetic world of `config.data.world` (its size, references and tasks) with another `seed` (a held-out
  set when the seed differs from the training world's), written once to `path`; returns `path`. ValueError if
  `path` holds a dataset of other examples."""
  from sparse_context_jax.data import WorldRecords, open_dataset, write_dataset
  w = config.data.world
  records = WorldRecords(count or w.count, seed, tuple(w.size), w.max_refs, tuple(w.tasks))
  if os.path.isdir(path) and os.listdir(path):
    found = open_dataset(path)
    if len(found) != len(records) or any(found.metadata.get(k) != v for k, v in records.metadata().items()):
      raise ValueError(f"{path!r} holds another dataset ({len(found)} records, {found.metadata}); expected the "
                       f"world {records.metadata()} with {len(records)} records")
    return path
  write_dataset(records, path, max_refs=w.max_refs, metadata=records.metadata())
  return path


def fixed_batches(path: str, config, count: int) -> list[dict]:
  """The first `count` records of the dataset at `path`, in order, as raw pipeline batches of
  `train.batch_size` (the last one padded with invalid examples)."""
  batches = []
  pipeline = make_pipeline(path, batch_size=config.train.batch_size, resolution=config.data.resolution,
                           shuffle=False, num_epochs=1, max_refs=config.data.max_refs)
  for raw in pipeline:
    if len(batches) * config.train.batch_size >= count:
      break
    raw = dict(raw)
    raw["valid"] = raw["valid"] & (len(batches) * config.train.batch_size + np.arange(len(raw["valid"])) < count)
    batches.append(raw)
  return batches


def psnr_scores(params, batches: list[dict], config, graphdef: nnx.GraphDef, *, keep: float = 1.0,
                steps: int = 16, seed: int = 0) -> dict[str, float]:
  """Mean PSNR (dB) of the generated targets against the ground truth over the valid examples of `batches`, in
  pixels at the tokens' resolution (`pixels_from_tokens`; the ground truth pooled the same way, so a perfect
  model scores inf): {"all": ..., task name: ...} for the tasks present. The noise and kept tokens of batch i come
  from (seed, i): the same params and batches always give the same numbers."""
  if not 0 < keep <= 1:
    raise ValueError(f"keep ratio {keep} is outside (0, 1]")
  cfg = C.model_config(config)
  text = HashedText(config.data.txt_len, cfg.context_dim, cfg.pooled_dim)
  per_task: dict[str, list[float]] = {}
  for i, raw in enumerate(batches):
    H, W = raw["target"].shape[1:3]
    batch = {k: jnp.asarray(v) for k, v in host_batch(raw, cfg, text).items()}
    sigma = jnp.asarray(eval_sigmas(config, batch["target"].shape[1], steps))
    key = jax.random.fold_in(jax.random.key(seed), i)
    out = PROGRAMS(params, batch, key, sigma, graphdef=graphdef, ratio=float(keep), grid=(H // 16, W // 16),
                   guidance=float(config.objective.guidance))
    made = pixels_from_tokens(np.asarray(out), H, W)
    truth = pixels_from_tokens(np.asarray(batch["target"]), H, W)
    for b in np.flatnonzero(raw["valid"]):
      per_task.setdefault(TASKS[int(raw["task"][b])], []).append(psnr(made[b], truth[b]))
  if not per_task:
    raise ValueError("no valid example in the evaluation batches")
  scores = {"all": float(np.mean([p for v in per_task.values() for p in v]))}
  scores.update({task: float(np.mean(v)) for task, v in per_task.items()})
  return scores


def mean_psnr(params, batches: list[dict], config, graphdef: nnx.GraphDef, *, keep: float = 1.0, steps: int = 16,
              seed: int = 0) -> float:
  """`psnr_scores(...)["all"]`: the mean PSNR (dB) over every valid example."""
  return psnr_scores(params, batches, config, graphdef, keep=keep, steps=steps, seed=seed)["all"]
