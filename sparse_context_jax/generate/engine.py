"""Batch generation over a `Pipeline`: jobs whose sampling programs have one signature share a batch, sharded over the
`data` axis of the pipeline's mesh.

Per job (once): reference images -> tokens (the pipeline's image encoder), seeded noise, the plan of its sparse request
(budgets, rung) and the strategy's scores (`attention`: one dense scoring pass of the first step, the job alone); all
on the device. Per batch: the gather and the whole denoising loop in one program, then the decode. A job's result does
not depend on its batch-mates: its noise comes from its seed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.encoders.base import PromptEmbeddings, to_uint8
from sparse_context_jax.generate.jobs import Job
from sparse_context_jax.generate.pipeline import Pipeline
from sparse_context_jax.model.positions import token_grid
from sparse_context_jax.model.reference_kv import cache_bytes
from sparse_context_jax.programs import signature
from sparse_context_jax.sampling import schedule_for
from sparse_context_jax.sparse import Plan, Reference


@dataclasses.dataclass
class Prepared:
  job: Job
  noise: jax.Array               # (N, C)
  latents: list[jax.Array]       # per reference (M_i, C) tokens
  scores: list[jax.Array]        # per reference (M_i,)
  plan: Plan                     # budgets (1, R) and the rung
  key: tuple                     # the sampling program's signature: jobs with equal keys share a batch

  @property
  def kept(self) -> list[int]:
    return self.plan.budgets[0].tolist()

  @property
  def sequence(self) -> int:
    """Image tokens of the packed sequence (target + reference slots)."""
    return self.plan.rung.length(self.noise.shape[0])

  @property
  def valid(self) -> int:
    return self.noise.shape[0] + int(self.plan.budgets[0].sum())


@dataclasses.dataclass
class Result:
  job: Job
  pixels: np.ndarray         # (H, W, 3) uint8
  latents: np.ndarray        # (N, C) float32
  prepared: Prepared
  batch_seconds: float       # wall time of the job's batch (sampling + decode)
  batch_size: int


@dataclasses.dataclass
class Failed:
  """A job that passed validation but failed when it ran (its error), reported, while the other jobs go on."""

  job: Job
  error: str


def _optional(value, dtype=np.float32):
  return None if value is None else np.asarray(value, dtype)


def _batch_of_one(value):
  """A per-job scalar (or None) as a batch of one, float32."""
  return None if value is None else np.asarray([value], np.float32)


class Generator:
  """Runs jobs through `pipeline` in batches of `batch_size` (rounded up to a multiple of the device count)."""

  def __init__(self, pipeline: Pipeline, *, batch_size: int = 4):
    self.pipeline, self.cfg, self.batch_size = pipeline, pipeline.cfg, batch_size

  def _inputs(self, rows: list[Prepared]) -> tuple[tuple, dict]:
    """The arguments and static values of the sampling call for the jobs `rows` (one job: its batch key)."""
    first = rows[0].job
    stack = lambda f: jnp.stack([f(p) for p in rows])
    host = lambda f: None if f(first) is None else np.stack([_optional(f(p.job)) for p in rows])
    prompt = PromptEmbeddings(host(lambda j: j.txt), host(lambda j: j.y))
    negative = None if first.neg_txt is None else PromptEmbeddings(host(lambda j: j.neg_txt), host(lambda j: j.neg_y))
    sigmas = jnp.asarray(schedule_for(self.cfg, rows[0].noise.shape[0], first.steps))
    args = (stack(lambda p: p.noise), sigmas, [stack(lambda p: p.latents[i]) for i in range(len(first.references))],
            [stack(lambda p: p.scores[i]) for i in range(len(first.references))],
            np.concatenate([p.plan.budgets for p in rows]), prompt, negative, host(lambda j: j.guidance),
            host(lambda j: j.cfg_scale))
    return args, dict(rung=rows[0].plan.rung, target_grid=token_grid(first.size))

  def kv_cache_bytes(self, p: Prepared) -> int | None:
    """Device memory of the job's reference K/V cache (its bucket's slots; doubled by true CFG), or None when the
    model samples with joint attention."""
    if self.cfg.reference_attention != "kv":
      return None
    return cache_bytes(self.cfg, 1 if p.job.cfg_scale is None else 2, p.plan.rung.slots, self.pipeline.dtype)

  # ---- per job ------------------------------------------------------------------------------------------------
  def prepare(self, job: Job) -> Prepared:
    assert not job.needs_encoding, f"job of line {job.line}: its text prompt was never encoded"
    pipe = self.pipeline
    refs = []
    for pixels, mask in zip(job.reference_pixels(), job.mask_arrays()):
      refs.append(Reference(pipe.encode_references(pixels[None]), job.size, pixels=pixels[None],
                            mask=None if mask is None else mask[None]))
    n = token_grid(job.size)[0] * token_grid(job.size)[1]
    noise = jax.random.normal(jax.random.PRNGKey(job.seed), (n, self.cfg.in_channels), jnp.float32)
    if "attention" in job.request.strategies:   # one dense scoring pass of the first step, this job alone
      prompt = PromptEmbeddings(job.txt[None], None if job.y is None else job.y[None])
      mass = pipe.attention_scores(noise[None], [r.latents for r in refs], prompt,
                                   schedule_for(self.cfg, n, job.steps)[0], _batch_of_one(job.guidance),
                                   target_grid=token_grid(job.size), grids=[r.grid for r in refs],
                                   blocks=job.request.attention_blocks)
      refs = [dataclasses.replace(r, attention=m) for r, m in zip(refs, mass)]
    plan, scores = pipe.select(refs, job.request)
    p = Prepared(job, noise, [r.latents[0] for r in refs], [s[0] for s in scores], plan, ())
    static = self._inputs([p])[1]
    p.key = signature(jax.eval_shape(lambda: self._inputs([p])[0]), static)   # shapes only: nothing is stacked
    return p

  # ---- per batch ----------------------------------------------------------------------------------------------
  def run_batch(self, batch: list[Prepared]) -> list[Result]:
    """Jobs of one key, padded with copies of the last job to the full batch size (rounded up to a multiple of
    the device count), so a short last batch reuses the same compiled program."""
    pipe = self.pipeline
    full = -(-self.batch_size // pipe.devices) * pipe.devices
    pad = batch + [batch[-1]] * (full - len(batch))
    (noise, sigmas, latents, scores, budgets, prompt, negative, guidance, scale), static = self._inputs(pad)
    shard = lambda tree: jax.tree.map(pipe.shard, tree)
    t0 = time.perf_counter()
    out = pipe.generate(shard(noise), sigmas, shard(latents), shard(scores), shard(budgets), shard(prompt),
                        shard(negative), shard(guidance), shard(scale), **static)
    pixels = jax.block_until_ready(pipe.decode(out, batch[0].job.size))
    seconds = time.perf_counter() - t0
    out, pixels = np.asarray(out), to_uint8(pixels)
    return [Result(p.job, pixels[i], out[i], p, seconds, len(batch)) for i, p in enumerate(batch)]

  def run(self, jobs: list[Job], progress=None, window: int | None = None):
    """Yields results batch by batch; jobs are grouped by the signature of their sampling program, within windows
    of `window` jobs (default 16 batches), so memory holds one window's prepared jobs, not the whole file.

    A batch that fails (an error of the data or of the device, not a bug of this code) yields one `Failed` per job
    of it, and the next batches run."""
    window = window or 16 * self.batch_size
    for start in range(0, len(jobs), window):
      groups: dict[tuple, list[Prepared]] = {}
      for job in jobs[start:start + window]:
        try:
          p = self.prepare(job)
        except (OSError, ValueError) as e:   # a file changed since validation, a request the references break
          yield Failed(job, f"{type(e).__name__}: {e}")
          continue
        groups.setdefault(p.key, []).append(p)
      for group in groups.values():
        for i in range(0, len(group), self.batch_size):
          batch = group[i:i + self.batch_size]
          try:
            results = self.run_batch(batch)
          except (OSError, ValueError, RuntimeError) as e:   # RuntimeError: XLA's (out of memory, ...)
            results = [Failed(p.job, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                       for p in batch]
          if progress is not None:
            progress.update(len(results))
          yield from results
