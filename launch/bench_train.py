"""Benchmark: train-step time with dense references vs random reference-token dropping at fixed keep ratios.

For each config (default the tiny and the medium one) and each keep ratio (default 1 = dense, 0.5, 0.25, 0.125;
one ladder rung per row: `objective.keep_low = keep_high = r`, `dense_prob = 0`) it compiles the real train step
(train/state.py `setup` / `init_state`, train/step.py `compile_step`) for one fixed pipeline batch of the
synthetic world, then times the steps of all rungs in interleaved rounds (one step of each rung per round, the
state threaded through, after --warmup untimed rounds), so a drift of the machine's speed hits every rung alike.
It prints the median step time, examples/s, tokens/s (tokens per example = text + target + the reference slots
of the rung, i.e. the packed sequence the step runs), the speedup vs dense, the ideal speedup from XLA's FLOP
counts of the two steps (lowered with unrolled layers: XLA counts a scanned stack's body once), and the compile
time; it writes a JSON of the rows and a PNG of speedup vs keep ratio into --out.

  python launch/bench_train.py                          # tiny and medium, 4 rungs, 8 timed rounds (~5 min, 2 cores)
  python launch/bench_train.py --quick                  # tiny only, 3 timed rounds: a check that it runs
  python launch/bench_train.py --configs medium --rounds 20 --config.train.batch_size=8
  python launch/bench_train.py --configs configs/medium.py:accelerator --synthetic   # klein 4B width, 512 px, GPU

`--config.KEY=VALUE` overrides apply to every config. Timings on a shared machine are only good for checking the
script; compare rows of one run (same machine, same moment), not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_context_jax import compile_cache  # noqa: E402
from sparse_context_jax.model.jitted import flops  # noqa: E402
from sparse_context_jax.parallel import batch_sharding, make_mesh  # noqa: E402
from sparse_context_jax.train import config as run_config  # noqa: E402
from sparse_context_jax.train.batches import pixel_batch, run_encoders  # noqa: E402
from sparse_context_jax.train.objective import step_rung  # noqa: E402
from sparse_context_jax.train.state import init_state, setup  # noqa: E402
from sparse_context_jax.train.step import compile_step  # noqa: E402
from plots import speedup_plot  # noqa: E402  (launch/, this script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="+", default=("tiny", "medium"),
                 help="names under configs/ (tiny, medium, ...) or paths FILE.py[:ARG]")
  p.add_argument("--keeps", type=float, nargs="+", default=(1.0, 0.5, 0.25, 0.125),
                 help="keep ratios, one rung each (1 = dense, the baseline of the speedups)")
  p.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of every rung per round)")
  p.add_argument("--warmup", type=int, default=2, help="untimed rounds after compiling")
  p.add_argument("--synthetic", action="store_true", help="random images of the config's shapes instead of a "
                 "synthetic-world batch (needs no dataset code: grain, tfds)")
  p.add_argument("--quick", action="store_true", help="tiny only, 3 timed rounds, 1 warm-up: a check that it runs")
  p.add_argument("--out", default="bench_out", help="folder for the JSON and the plot")
  args, args.overrides = run_config.parse_with_overrides(p, argv)
  if args.quick:
    args.configs, args.rounds, args.warmup = ("tiny",), 3, 1
  if 1.0 not in args.keeps:
    p.error("--keeps must include 1 (dense, the baseline)")
  return args


def load_config(name: str, overrides: list[str], keep: float):
  """The config `name` with the overrides and one keep-ratio rung (`keep`, never dense otherwise)."""
  spec = name if name.endswith(".py") or ".py:" in name else os.path.join(ROOT, "configs", f"{name}.py")
  rung = [f"objective.keep_low={keep}", f"objective.keep_high={keep}", "objective.dense_prob=0.0",
          "log.progress=False"]
  return run_config.apply_overrides(run_config.load(spec), list(overrides) + rung)


def world_batch(config, workdir: str) -> dict:
  """One pipeline batch of the config's synthetic world (only `batch_size` examples written)."""
  from sparse_context_jax.data.pipeline import make_pipeline
  from sparse_context_jax.train.loop import dataset_path
  config.data.world.count = config.train.batch_size
  return next(iter(make_pipeline(dataset_path(config, workdir), batch_size=config.train.batch_size,
                                 resolution=config.data.resolution, max_refs=config.data.max_refs)))


def random_batch(config) -> dict:
  """A pipeline-shaped batch of random square images of side `data.resolution`, every reference slot used."""
  rng = np.random.default_rng(0)
  B, R, side = config.train.batch_size, config.data.max_refs, config.data.resolution
  return dict(target=rng.integers(0, 256, (B, side, side, 3), np.uint8),
              references=rng.integers(0, 256, (B, R, side, side, 3), np.uint8), ref_valid=np.ones((B, R), bool),
              caption=np.asarray(["a red square at the top left"] * B), valid=np.ones((B,), bool))


def fixed_batch(config, cfg, mesh, workdir: str, synthetic: bool) -> tuple[dict, tuple[int, int]]:
  """The benchmark's one batch, on the mesh, and its token grid."""
  raw = random_batch(config) if synthetic else world_batch(config, workdir)
  local, grid = pixel_batch(raw, cfg, *run_encoders(config, cfg))
  return {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in local.items()}, grid


def bench_config(name: str, args) -> list[dict]:
  """Rows of one config: compile every rung's step, then time them interleaved."""
  configs = {keep: load_config(name, args.overrides, keep) for keep in args.keeps}
  config = configs[1.0]
  run_config.validate(config, jax.device_count())
  cfg = run_config.model_config(config)
  mesh = make_mesh(config.mesh, jax.devices())
  static = setup(config, cfg, mesh)
  state = init_state(config, cfg, static)
  with tempfile.TemporaryDirectory() as tmp:
    batch, grid = fixed_batch(config, cfg, mesh, tmp, args.synthetic)
  B, T = batch["txt"].shape[:2]
  R, M = batch["refs"].shape[1:3]
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  print(f"\n{name}: hidden {cfg.hidden_size}, {cfg.depth_double}+{cfg.depth_single} blocks, {n_params:,} parameters, "
        f"{config.model.dtype} on {jax.devices()[0].device_kind}; batch {B}, {T} text + {grid[0] * grid[1]} target "
        f"tokens, {R} reference slots of {M} tokens", flush=True)
  # XLA counts a scanned block stack's body once: FLOPs come from lowering (no compile) the unscanned step. Only
  # the model graph differs (scan_layers): each rung's config serves both steps.
  unrolled = setup(load_config(name, args.overrides + ["model.scan_layers=False"], 1.0), cfg, mesh)
  programs = {}
  for keep, c in configs.items():
    rung = step_rung(c.objective, c.seed, 0, grid, R)   # the rung the loop would draw: keep snapped up to the ladder
    tic = time.perf_counter()
    compiled = compile_step(static, c, rung, batch).lower(state, batch).compile()
    compile_s = time.perf_counter() - tic
    lowered = compile_step(unrolled, c, rung, batch).lower(unrolled.abstract, batch)
    programs[keep] = dict(ratio=rung.ratio, program=compiled, compile_s=compile_s, flops=flops(lowered),
                          seq=T + rung.length(grid[0] * grid[1]))
  times, losses = {keep: [] for keep in programs}, {}
  for round_ in range(args.warmup + args.rounds):
    for keep, p in programs.items():
      tic = time.perf_counter()
      state, metrics = p["program"](state, batch)
      jax.block_until_ready((state, metrics))
      if round_ >= args.warmup:
        times[keep].append(time.perf_counter() - tic)
      losses[keep] = float(metrics["loss"])
  dense = programs[1.0]
  dense_s = float(np.median(times[1.0]))
  rows = []
  for keep, p in programs.items():
    sec = float(np.median(times[keep]))
    rows.append(dict(config=name, keep=keep, rung=p["ratio"], seq=p["seq"], step_ms=1e3 * sec,
                     examples_per_s=B / sec, tokens_per_s=B * p["seq"] / sec, speedup=dense_s / sec,
                     ideal=dense["flops"] / p["flops"], gflop=p["flops"] / 1e9, compile_s=p["compile_s"],
                     rounds=args.rounds, last_loss=losses[keep]))
  return rows


HEADER = (f"{'config':>8} {'keep':>6} {'tokens':>6} {'step ms':>9} {'ex/s':>8} {'tok/s':>9} {'speedup':>8} "
          f"{'ideal':>6} {'ach/ideal':>9} {'GFLOP':>8} {'compile s':>9}")


def fmt(r: dict) -> str:
  return (f"{r['config']:>8} {r['keep']:>6g} {r['seq']:>6} {r['step_ms']:>9.1f} {r['examples_per_s']:>8.1f} "
          f"{r['tokens_per_s']:>9.0f} {r['speedup']:>7.2f}x {r['ideal']:>5.2f}x {r['speedup'] / r['ideal']:>9.2f} "
          f"{r['gflop']:>8.2f} {r['compile_s']:>9.1f}")


def plot(rows: list[dict], path: str, title: str) -> None:
  series = {}
  for r in rows:
    series.setdefault(r["config"], []).append((r["keep"], r["speedup"], r["ideal"]))
  speedup_plot(series, path, title, "train step speedup vs dense references",
               "keep ratio of reference tokens in training")


def main(argv=None) -> int:
  compile_cache.enable()   # a rerun reads its programs back ($SCJ_COMPILE_CACHE=off: compile again)
  args = parse_args(argv)
  rows = []
  for name in args.configs:
    try:
      new = bench_config(name, args)
    except run_config.ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(HEADER)
    for r in new:
      print(fmt(r), flush=True)
    rows += new
  os.makedirs(args.out, exist_ok=True)
  tag = f"{'_'.join(os.path.basename(n).split('.py')[0] for n in args.configs)}_{jax.devices()[0].platform}"
  with open(os.path.join(args.out, f"bench_train_{tag}.json"), "w") as f:
    json.dump(rows, f, indent=1)
  plot(rows, os.path.join(args.out, f"bench_train_{tag}.png"),
       f"train step, median of {args.rounds} interleaved rounds, {jax.devices()[0].device_kind}")
  print(f"\nwrote {args.out}/bench_train_{tag}.json and .png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
