"""What a run learned: targets generated from noise, conditioned on the (dense or sparse) references and the
caption, scored in pixels against the exact ground truth of the synthetic world.

```python
batches = fixed_batches(write_world(config, path, seed=1), config, count=32)   # a held-out world
scores = psnr_scores(state["params"], batches, config, setup.graphdef, keep=0.25, steps=16)
scores["all"], scores["editing"], scores["composition"]                         # mean PSNR in dB
```
Generation goes through the generation `Pipeline` with the run's encoders and the run's current parameters
(`generate(..., params=...)`): random reference tokens kept at the keep ratio, the training distribution. One
pipeline per model graph, so its `generate` program compiles once per (keep ratio, Euler steps, batch shape) across
calls; `PROGRAMS.count` counts those programs.
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
from sparse_context_jax.encoders import PromptEmbeddings
from sparse_context_jax.generate.pipeline import Pipeline
from sparse_context_jax.sampling.schedule import flux1_mu, sigmas
from sparse_context_jax.sparse.buckets import rung_at
from sparse_context_jax.sparse.scores import random_scores
from sparse_context_jax.train.batches import pixel_batch, run_encoders
from sparse_context_jax.train.config import model_config

_PIPELINES: dict = {}   # (graphdef, encoder names) -> Pipeline


class _Programs:
  """The count of evaluation's `generate` programs, over every model graph evaluated so far."""

  @property
  def count(self) -> int:
    return sum(p.sampler.programs.count for p in _PIPELINES.values())


PROGRAMS = _Programs()


def _pipeline(params, graphdef: nnx.GraphDef, config) -> Pipeline:
  image, text = run_encoders(config, model_config(config))
  key = (graphdef, image.name, text.name)
  if key not in _PIPELINES:
    _PIPELINES[key] = Pipeline(nnx.merge(graphdef, params), image, text)
  return _PIPELINES[key]


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
  pixels at the tokens' resolution (the image encoder's `decode`; the ground truth encoded and decoded the same
  way, so a perfect model scores inf): {"all": ..., task name: ...} for the tasks present. The noise and kept
  tokens of batch i come from (seed, i): the same params and batches always give the same numbers."""
  if not 0 < keep <= 1:
    raise ValueError(f"keep ratio {keep} is outside (0, 1]")
  cfg = model_config(config)
  pipe = _pipeline(params, graphdef, config)
  per_task: dict[str, list[float]] = {}
  for i, raw in enumerate(batches):
    size = raw["target"].shape[1:3]
    batch, grid = pixel_batch(raw, cfg, pipe.image, pipe.text)
    B, R = batch["refs"].shape[:2]
    rung = rung_at(keep, (grid,) * R)   # keep * tokens of each reference, at random: the training distribution
    key = jax.random.fold_in(jax.random.key(seed), i)
    k_noise, k_drop = jax.random.split(key)
    noise = jax.random.normal(k_noise, batch["target"].shape, jnp.float32)
    scores = [random_scores(k, B, grid) for k in jax.random.split(k_drop, R)]
    budgets = np.where(batch["ref_valid"], rung.capacities, 0).astype(np.int32)
    prompt = PromptEmbeddings(batch["txt"], batch.get("y"))
    guidance = np.full((B,), config.objective.guidance, np.float32) if cfg.guidance_embed else None
    out = pipe.generate(noise, jnp.asarray(eval_sigmas(config, grid[0] * grid[1], steps)),
                        [batch["refs"][:, r] for r in range(R)], scores, budgets, prompt, guidance=guidance,
                        rung=rung, target_grid=grid, params=params)
    made = pipe.decode(np.asarray(out), size)
    truth = pipe.decode(batch["target"], size)
    for b in np.flatnonzero(raw["valid"]):
      per_task.setdefault(TASKS[int(raw["task"][b])], []).append(psnr(made[b], truth[b], peak=2.0))
  if not per_task:
    raise ValueError("no valid example in the evaluation batches")
  scores = {"all": float(np.mean([p for v in per_task.values() for p in v]))}
  scores.update({task: float(np.mean(v)) for task, v in per_task.items()})
  return scores


def mean_psnr(params, batches: list[dict], config, graphdef: nnx.GraphDef, *, keep: float = 1.0, steps: int = 16,
              seed: int = 0) -> float:
  """`psnr_scores(...)["all"]`: the mean PSNR (dB) over every valid example."""
  return psnr_scores(params, batches, config, graphdef, keep=keep, steps=steps, seed=seed)["all"]

