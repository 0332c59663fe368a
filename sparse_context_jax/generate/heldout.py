"""Held-out synthetic-world examples through the `Generator`, scored against their exact ground truth: what the main
job (`demo`) and the paper's experiment in miniature (launch/paper_table.py) both measure.

    examples = heldout_examples(config.data.world, count=32, seed=1, refs=2, tasks=("composition",))
    jobs = world_jobs(cfg, examples, lambda ex, i: SparseRequest("edge", keep=0.25, seed=i), steps=16)
    run = run_world(generator, text_encoder, jobs, txt_len=config.data.txt_len, batch=4, repeats=2)
    psnr_to(run.pixels, [at_tokens(image, ex.target, size) for ex in examples])

Every job of one call gets the same noise seed as its example index, so two requests over the same examples differ
only in the reference tokens they keep.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from sparse_context_jax.data.world import SyntheticExample, example, psnr
from sparse_context_jax.encoders.base import to_uint8, unit_range
from sparse_context_jax.figures import grid_png, kept_overlay
from sparse_context_jax.generate.engine import Failed, Generator, Result
from sparse_context_jax.generate.jobs import Job, make_job
from sparse_context_jax.generate.prompts import encode_job_prompts
from sparse_context_jax.sparse import SparseRequest
from sparse_context_jax.sparse.select import top_k


@dataclasses.dataclass
class WorldRun:
  results: list[Result]        # in job order
  images_per_s: float          # end to end (reference tokens, scores, batches), median of the timed passes
  sampling_s: float            # the sampling programs' seconds per image (the batches' wall time / batch size)

  @property
  def pixels(self) -> list[np.ndarray]:
    return [r.pixels for r in self.results]

  @property
  def kept(self) -> int:
    """Reference tokens kept over every job."""
    return sum(sum(r.prepared.kept) for r in self.results)


def heldout_examples(world, count: int, seed: int, refs: int | None = None,
                     tasks: Sequence[str] | None = None) -> list[SyntheticExample]:
  """`count` examples of the world `seed` (the training world's size; its references and tasks unless given):
  `refs` fixes the composition examples' reference count (editing has one)."""
  size, tasks = tuple(world.size), tuple(tasks or world.tasks)
  lo, hi = (refs, refs) if refs else (1, world.max_refs)
  return [example(seed, i, size, hi, tasks, lo) for i in range(count)]


def at_tokens(image, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 `pixels` as the image encoder sees them (encoded and decoded): the resolution quality is measured at."""
  return to_uint8(image.decode(image.encode(unit_range(pixels)), size))


def psnr_to(made: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> list[float]:
  return [psnr(a, b) for a, b in zip(made, truth, strict=True)]


def copy_psnr(image, examples: Sequence[SyntheticExample], truth: Sequence[np.ndarray]) -> list[float]:
  """PSNR of copying each example's first reference (the answer of an editor that ignores the caption)."""
  return psnr_to([at_tokens(image, ex.references[0], tuple(ex.target.shape[:2])) for ex in examples], truth)


def mean_target(image, world, count: int = 256) -> np.ndarray:
  """The mean target of the first `count` examples of the training world (`world`: a config's `data.world`, its
  seed, references and tasks) at the tokens' resolution, uint8: the best answer that ignores references and
  caption, the other baseline beside copying."""
  size = tuple(world.size)
  targets = [at_tokens(image, ex.target, size).astype(np.float64)
             for ex in heldout_examples(world, count, seed=world.seed)]
  return np.round(np.mean(targets, axis=0)).astype(np.uint8)


def world_jobs(cfg, examples: Sequence[SyntheticExample], request: Callable[[SyntheticExample, int], SparseRequest],
               steps: int) -> list[Job]:
  """One job per example (caption as the prompt, its references and masks), noise seed = its index."""
  return [make_job(cfg, line=i, output=None, references=[unit_range(r) for r in ex.references],
                   masks=[m > 127 for m in ex.masks], request=request(ex, i), size=tuple(ex.target.shape[:2]),
                   prompt=ex.caption, steps=steps, seed=i)
          for i, ex in enumerate(examples)]


def run_world(gen: Generator, text, jobs: list[Job], *, txt_len: int, batch: int, repeats: int = 1) -> WorldRun:
  """Encodes the jobs' prompts and generates them: one untimed pass (it compiles), then `repeats` timed passes.
  A job of these examples failing, or a caption longer than `txt_len`, is a bug: AssertionError with its error."""
  jobs, bad, cut = encode_job_prompts(jobs, text, max_sequence_length=txt_len, batch_size=batch)
  if bad or cut:
    raise AssertionError(f"invalid synthetic-world jobs: {bad + cut}")

  def generate() -> list[Result]:
    results = list(gen.run(jobs))
    failed = [r for r in results if isinstance(r, Failed)]
    if failed:
      raise AssertionError(f"synthetic-world job {failed[0].job.line} failed: {failed[0].error}")
    return sorted(results, key=lambda r: r.job.line)

  made, seconds, sampling = generate(), [], []
  for _ in range(repeats):
    tic = time.perf_counter()
    made = generate()
    seconds.append(time.perf_counter() - tic)
    sampling.append(sum(r.batch_seconds / r.batch_size for r in made) / len(made))
  if not seconds:
    return WorldRun(made, float("nan"), float("nan"))
  return WorldRun(made, len(made) / float(np.median(seconds)), float(np.median(sampling)))


def example_grid(image, examples: Sequence[SyntheticExample], runs: dict[str, list[Result]], overlay: str,
                 tile: int = 96) -> bytes:
  """A PNG, one row per example: its first two references, the ground truth, each run's image (`runs`: column title
  -> results in example order) and the first reference with the tokens run `overlay` kept (the rest dimmed)."""
  rows = []
  for i, ex in enumerate(examples):
    size = tuple(ex.target.shape[:2])
    grid = (size[0] // image.token_pixels, size[1] // image.token_pixels)
    refs = [at_tokens(image, r, size) for r in ex.references]
    kept = runs[overlay][i].prepared
    idx, ok = top_k(kept.scores[0][None], np.asarray(kept.kept[:1]), grid[0] * grid[1])
    rows.append([refs[0], refs[1] if len(refs) > 1 else None, at_tokens(image, ex.target, size),
                 *(results[i].pixels for results in runs.values()),
                 kept_overlay(refs[0], np.asarray(idx)[0][np.asarray(ok)[0]], grid)])
  titles = ["reference 1", "reference 2", "ground truth", *runs, f"kept ({overlay})"]
  return grid_png(rows, titles, tile)
