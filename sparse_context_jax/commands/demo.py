"""The main job: the released presets abstractly, then a small FLUX.2-shaped model that learned the synthetic world
generating held-out examples dense and with sparse references, scored against their exact ground truth.

The model is configs/world.py trained by the train program (train/loop.py) on its first run, about two minutes on 2
CPU cores, and cached under the user cache folder by a hash of what determines it (the config with its seeds and
overrides, and the world generator's code); later runs load it. Training goes to a scratch folder renamed into
place with a `.complete` marker once it finished: an interrupted training is never taken for a model.

Generation goes through the `generate` command's path (`Generator` over a `Pipeline`, with the encoders the run
recorded): each held-out example dense, with the task-aware sparse default (hybrid: edges for editing, saliency for
composition) at --keep, and with random tokens at --keep, from the same noise. The figure (--out/grid.png) shows
references, ground truth, the three generations and the tokens the task-aware selection kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from sparse_context_jax.cli import UserError
from sparse_context_jax.commands.presets import table

EXTRA_PREFIX = "--config."   # --config.KEY=VALUE overrides of configs/world.py (they change the model's hash)
WORLD_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "world.py"
WORLD_CODE = Path(__file__).resolve().parents[1] / "data" / "world.py"
COMPLETE = ".complete"


def add_arguments(parser) -> None:
  parser.add_argument("--steps", type=int, default=None, help="train steps of the world model (default the "
                      "config's); another count is another cached model")
  parser.add_argument("--seed", type=int, default=0, help="the training seed (another seed, another model)")
  parser.add_argument("--examples", type=int, default=32, help="held-out synthetic-world examples generated (the "
                      "tasks alternate)")
  parser.add_argument("--keep", type=float, default=0.25, help="keep ratio of the sparse runs, in (0, 1]")
  parser.add_argument("--sample-steps", type=int, default=16, help="Euler steps per generated image")
  parser.add_argument("--batch", type=int, default=4, help="generation batch size")
  parser.add_argument("--repeats", type=int, default=2, help="timed passes over the examples per run (after one "
                      "untimed pass that compiles)")
  parser.add_argument("--rows", type=int, default=4, help="examples shown in the grid")
  parser.add_argument("--cache", default=None, metavar="DIR", help="where trained models are cached (default "
                      "${XDG_CACHE_HOME:-~/.cache}/sparse_context_jax)")
  parser.add_argument("--retrain", action="store_true", help="train again even if the model is cached")
  parser.add_argument("--skip-presets", action="store_true", help="do not print the preset table")
  parser.add_argument("--out", default="demo_out", help="folder for grid.png and the generated PNGs")
  parser.epilog = ("Override a key of configs/world.py with --config.KEY=VALUE (e.g. --config.train.lr=1e-3); "
                   "the model is cached per config.")


def _check(args) -> None:
  problems = []
  if not 0 < args.keep <= 1:
    problems.append(f"--keep {args.keep} (expected a ratio in (0, 1])")
  for name in ("examples", "sample_steps", "batch", "repeats"):
    if getattr(args, name) <= 0:
      problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} (expected > 0)")
  for name in ("steps", "rows"):
    value = getattr(args, name)
    if value is not None and value < (1 if name == "steps" else 0):
      problems.append(f"--{name} {value} (expected {'> 0' if name == 'steps' else '>= 0'})")
  if problems:
    raise UserError("; ".join(problems))


def cache_root(flag: str | None) -> Path:
  return Path(flag) if flag else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_context_jax"


def world_config(args):
  """configs/world.py with --seed, --steps and the --config.KEY=VALUE overrides applied, validated."""
  import jax
  from sparse_context_jax.train import config as run_config
  overrides = [f"seed={args.seed}", *([f"train.steps={args.steps}"] if args.steps else []), *args.extra]
  try:
    config = run_config.apply_overrides(run_config.load(str(WORLD_CONFIG)), overrides)
    if config.train.steps % config.checkpoint.every:
      config.checkpoint.every = config.train.steps   # one checkpoint, the final one
    run_config.validate(config, jax.device_count())
  except run_config.ConfigError as e:
    raise UserError(str(e)) from None
  return config


def model_hash(config) -> str:
  """12 hex digits of what determines the trained model: the config (seeds and overrides included) and the code
  of the world it learns."""
  h = hashlib.sha256(json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True).encode())
  h.update(WORLD_CODE.read_bytes())
  return h.hexdigest()[:12]


def trained_model(config, cache: Path, retrain: bool = False) -> tuple[Path, float | None]:
  """(the run folder of the trained world model, training seconds or None when it came from the cache). Trains
  under a lock into `world-HASH.partial-PID`, marks it complete and renames it to `world-HASH`; a folder without
  the marker (or a partial one left by a killed run) is discarded, never loaded."""
  from sparse_context_jax.train.loop import Outcome, train
  final = cache / f"world-{model_hash(config)}"
  if (final / COMPLETE).is_file() and not retrain:
    return final, None
  cache.mkdir(parents=True, exist_ok=True)
  with open(f"{final}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # another demo training the same model: wait for it, then use its model
    if (final / COMPLETE).is_file() and not retrain:
      return final, None
    for stale in cache.glob(f"{final.name}.partial-*"):   # the lock is ours: nobody is writing these
      shutil.rmtree(stale, ignore_errors=True)
    scratch = cache / f"{final.name}.partial-{os.getpid()}"
    print(f"training the world model (first run; cached in {final}) ...", flush=True)
    outcome, tic = Outcome(), time.perf_counter()
    try:
      train(config, str(scratch), outcome=outcome)
      if outcome.preempted:
        raise UserError(f"training was stopped at step {outcome.step} of {config.train.steps}: nothing was "
                        "cached (run again to train from the start)")
      seconds = time.perf_counter() - tic
      (scratch / COMPLETE).write_text(json.dumps({"steps": outcome.step, "seconds": round(seconds, 2)}) + "\n")
      if final.exists():   # --retrain, or a folder without its marker
        shutil.rmtree(final)
      os.rename(scratch, final)
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
  return final, seconds


def _describe_training(config, run_dir: Path, seconds: float | None) -> str:
  from sparse_context_jax.train.metrics import read_metrics
  metrics = read_metrics(run_dir)
  losses = [m["loss"] for m in metrics if "loss" in m]
  steps = [m["step_seconds"] for m in metrics if "step_seconds" in m]
  compiles = [m["seconds"] for m in metrics if m.get("event") == "compile"]
  w = config.data.world
  what = (f"{config.train.steps} steps of batch {config.train.batch_size} on {w.count} synthetic-world examples "
          f"{w.size[0]}x{w.size[1]} (final loss {np.mean(losses[-5:]):.4f}; median step {1e3 * np.median(steps):.1f}"
          f" ms, {len(compiles)} compiles {sum(compiles):.1f} s)")
  done = json.loads((run_dir / COMPLETE).read_text())
  return (f"trained now in {seconds:.1f} s: {what}" if seconds is not None else
          f"loaded from the cache {run_dir} (trained in {done['seconds']:.1f} s): {what}")


def run(args) -> int:
  _check(args)
  import sparse_context_jax.compile_cache as compile_cache
  compile_cache.enable()
  config = world_config(args)
  if not args.skip_presets:
    print("Released FLUX architectures (built abstractly with jax.eval_shape; no weights allocated):")
    print(table())
    print()
  run_dir, seconds = trained_model(config, cache_root(args.cache), args.retrain)
  print(_describe_training(config, run_dir, seconds))
  _generation(args, config, run_dir)
  return 0


def _requests(keep: float) -> dict:
  """Per run, the request of example i of a task: dense, the task-aware default at `keep`, random at `keep`."""
  from sparse_context_jax.generate.jobs import TASK_STRATEGY
  from sparse_context_jax.sparse import SparseRequest
  return {"dense": lambda ex, i: SparseRequest("random", keep=1.0, seed=i),   # every token: no scores needed
          f"task-aware, keep {keep:g}": lambda ex, i: SparseRequest(
              "hybrid", keep=keep, hybrid_base=TASK_STRATEGY[ex.task][1], seed=i),
          f"random, keep {keep:g}": lambda ex, i: SparseRequest("random", keep=keep, seed=i)}


def _generation(args, config, run_dir: Path) -> None:
  import jax
  from jax.sharding import Mesh

  from sparse_context_jax.convert import load_model
  from sparse_context_jax.convert.run import open_run
  from sparse_context_jax.encoders import records
  from sparse_context_jax.generate import Generator, Pipeline
  from sparse_context_jax.generate.heldout import (at_tokens, copy_psnr, example_grid, heldout_examples,
                                                   mean_target, psnr_to, run_world, world_jobs)
  from sparse_context_jax.images import encode_png
  from sparse_context_jax.model.positions import token_grid

  opened = open_run(run_dir)
  image, text = records.image_encoder(opened.encoders["image"]), records.text_encoder(opened.encoders["text"])
  pipeline = Pipeline(load_model(run_dir), image, mesh=Mesh(np.array(jax.devices()), ("data",)))
  gen = Generator(pipeline, batch_size=args.batch)
  w = config.data.world
  examples = heldout_examples(w, args.examples, seed=w.seed + 1)   # the world learn_world.py holds out
  size, grid = tuple(w.size), token_grid(tuple(w.size))
  truth = [at_tokens(image, ex.target, size) for ex in examples]
  tasks = sorted({ex.task for ex in examples})
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)

  print(f"\nHeld-out synthetic-world examples ({args.examples}: {', '.join(tasks)}; world seed "
        f"{w.seed + 1}, never trained on), {args.sample_steps} Euler steps, batches of {args.batch}, "
        f"through the Generator with the run's encoders ({image.name}, {text.name}). PSNR (dB) against the exact "
        f"ground truth at the tokens' resolution ({truth[0].shape[0]}x{truth[0].shape[1]} px):")
  header = f"{'run':<22} {'PSNR':>6} " + "".join(f"{t:>12}" for t in tasks)
  print(f"\n{header} {'kept ref tokens':>16} {'images/s':>9} {'speed-up':>9} {'sampling ms/img':>16}")
  scores = lambda made: {"all": float(np.mean(made)),
                         **{t: float(np.mean([p for p, ex in zip(made, examples) if ex.task == t])) for t in tasks}}
  baselines = {"copy first reference": scores(copy_psnr(image, examples, truth)),
               "mean training target": scores(psnr_to([mean_target(image, w)] * len(truth), truth))}
  total = sum(len(ex.references) * grid[0] * grid[1] for ex in examples)
  results, base = {}, None
  for name, request in _requests(args.keep).items():
    run = run_world(gen, text, world_jobs(opened.model, examples, request, args.sample_steps),
                    txt_len=config.data.txt_len, batch=args.batch, repeats=args.repeats)
    base = base or run.images_per_s
    s = scores(psnr_to(run.pixels, truth))
    results[name] = run.results
    print(f"{name:<22} {s['all']:>6.2f} " + "".join(f"{s[t]:>12.2f}" for t in tasks) +
          f" {f'{run.kept}/{total}':>16} {run.images_per_s:>9.1f} {run.images_per_s / base:>8.2f}x "
          f"{1e3 * run.sampling_s:>16.2f}")
    for r in run.results:
      (out / f"{name.split(',')[0]}_{r.job.line}.png").write_bytes(encode_png(r.pixels))
  for name, b in baselines.items():
    print(f"{name:<22} {b['all']:>6.2f} " + "".join(f"{b[t]:>12.2f}" for t in tasks))

  if args.rows:
    names = list(results)
    titles = ["dense", f"task-aware {args.keep:g}", f"random {args.keep:g}"]
    (out / "grid.png").write_bytes(example_grid(image, examples[:args.rows], dict(zip(titles, results.values())),
                                                overlay=titles[1]))
  print(f"\nwrote {out}/grid.png and the generated PNGs (run_INDEX.png)")
