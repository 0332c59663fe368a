"""Does the model learn the synthetic world? Trains a config (default the tiny one) and reports what it learned.

It trains with the train program (train/loop.py `train`) into a fresh --workdir, then prints
- the loss curve: the mean loss over each window of --every steps (from metrics.jsonl) and the keep ratios drawn;
- the PSNR (dB) of targets generated from noise (train/evaluate.py, --sample-steps Euler steps) against the exact
  ground truth, before training (the random init) and after, with dense references and at --keep, on held-out
  examples (a world of another seed) and on training examples, overall and per task;
- two reference points on the held-out examples: copying the first reference (the answer of an editing model that
  ignores the caption) and the mean training target (the best answer that ignores references and caption).
It writes learn_world.png (the loss curve) and learn_world.json (every number) into the workdir.

  python launch/learn_world.py --workdir /tmp/learn                  # tiny, 1500 steps: ~2 min on 2 CPU cores
  python launch/learn_world.py --workdir /tmp/learn --steps 300      # a shorter look
  python launch/learn_world.py --workdir /tmp/learn1 --config configs/tiny.py:flux1 --config.train.lr=1e-3

Unless overridden, the run uses LEARN (below): a higher constant learning rate than the tiny config's, and three
keep-ratio rungs (1/4, 1/2, dense) so that only three train steps compile. `--config.KEY=VALUE` overrides any key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_context_jax.data.manifest import TASKS  # noqa: E402
from sparse_context_jax.data.world import psnr  # noqa: E402
from sparse_context_jax.parallel import make_mesh  # noqa: E402
from sparse_context_jax.encoders import PixelTokens, unit_range  # noqa: E402
from sparse_context_jax.train import config as run_config  # noqa: E402
from sparse_context_jax.train import evaluate  # noqa: E402
from sparse_context_jax.train.loop import dataset_path, train  # noqa: E402
from sparse_context_jax.train.metrics import read_metrics  # noqa: E402
from sparse_context_jax.train.state import init_state, setup  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARN = ["train.steps=1500", "train.lr=3e-3", "train.schedule=constant", "train.warmup_steps=20",
         "objective.ladder=(0.25, 0.5, 1.0)", "objective.keep_low=0.25", "objective.dense_prob=0.25",
         "checkpoint.every=500", "log.every=10", "log.progress=False"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"), metavar="FILE.py[:ARG]")
  p.add_argument("--workdir", required=True, help="a fresh folder: the run, learn_world.png and .json")
  p.add_argument("--steps", type=int, default=None, help="train steps (default LEARN's)")
  p.add_argument("--every", type=int, default=None, help="loss-table window in steps (default steps / 10)")
  p.add_argument("--keep", type=float, default=0.25, help="the sparse keep ratio evaluated besides dense")
  p.add_argument("--eval-examples", type=int, default=32, help="held-out and training examples evaluated")
  p.add_argument("--sample-steps", type=int, default=16, help="Euler steps of the generated targets")
  args, overrides = run_config.parse_with_overrides(p, argv)
  args.overrides = LEARN + overrides
  if args.steps is not None:
    args.overrides.append(f"train.steps={args.steps}")
  return args


def loss_table(workdir: str, every: int) -> list[dict]:
  """Per window of `every` steps: mean, min and max loss and the keep ratios drawn."""
  logged = [m for m in read_metrics(workdir) if "loss" in m]
  rows = []
  for end in range(every, logged[-1]["step"] + every, every):
    window = [m for m in logged if end - every < m["step"] <= end]
    if window:
      loss = [m["loss"] for m in window]
      rows.append(dict(step=window[-1]["step"], loss=float(np.mean(loss)), min=min(loss), max=max(loss),
                       keeps=sorted({m["keep"] for m in window})))
  return rows


def reference_points(heldout: list[dict], train_batches: list[dict], channels: int) -> dict:
  """Held-out PSNR ({"all", task: dB}) of copying the first reference and of the mean training target, in pixels
  at the tokens' resolution (as `evaluate.psnr_scores`)."""
  tokens = PixelTokens(channels)
  px = lambda images: tokens.decode(tokens.encode(unit_range(images)), images.shape[-3:-1])
  mean = np.mean(np.concatenate([px(b["target"])[b["valid"]] for b in train_batches]), axis=0)
  scores = {"copy first reference": {}, "mean training target": {}}
  for b in heldout:
    truth, first = px(b["target"]), px(b["references"][:, 0])
    for i in np.flatnonzero(b["valid"]):
      for name, guess in (("copy first reference", first[i]), ("mean training target", mean)):
        for group in ("all", TASKS[int(b["task"][i])]):
          scores[name].setdefault(group, []).append(psnr(guess, truth[i], peak=2.0))
  return {name: {g: float(np.mean(v)) for g, v in groups.items()} for name, groups in scores.items()}


def plot(workdir: str, table: list[dict], title: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  logged = [m for m in read_metrics(workdir) if "loss" in m]
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  ax.plot([m["step"] for m in logged], [m["loss"] for m in logged], color="C0", alpha=0.3, lw=0.8,
          label="logged steps")
  ax.plot([r["step"] for r in table], [r["loss"] for r in table], "o-", color="C0", label="window mean")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("flow-matching loss")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "learn_world.png")
  fig.savefig(path)
  return path


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config = run_config.apply_overrides(run_config.load(args.config), args.overrides)
    run_config.validate(config, jax.device_count())
  except run_config.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
    print(f"error: {args.workdir!r} already holds a run (metrics.jsonl); give a fresh --workdir", file=sys.stderr)
    return 2
  cfg = run_config.model_config(config)
  static = setup(config, cfg, make_mesh(config.mesh, jax.devices()))
  n = args.eval_examples
  heldout = evaluate.fixed_batches(evaluate.write_world(config, os.path.join(args.workdir, "heldout"),
                                                        seed=config.data.world.seed + 1, count=n), config, n)
  seen = evaluate.fixed_batches(dataset_path(config, args.workdir), config, n)
  sets = {"held-out": heldout, "train": seen}
  keeps = {"dense": 1.0, f"keep {args.keep:g}": args.keep}

  def scores(params) -> dict:
    return {f"{name} {label}": evaluate.psnr_scores(params, batches, config, static.graphdef, keep=keep,
                                                    steps=args.sample_steps)
            for name, batches in sets.items() for label, keep in keeps.items()}

  print(f"{args.config}: hidden {cfg.hidden_size}, {cfg.depth_double}+{cfg.depth_single} blocks, world of "
        f"{config.data.world.count} examples {tuple(config.data.world.size)}, batch {config.train.batch_size}, "
        f"lr {config.train.lr:g} ({config.train.schedule}), {config.train.steps} steps; evaluating {n} held-out and "
        f"{n} training examples with {args.sample_steps} Euler steps", flush=True)
  before = scores(init_state(config, cfg, static)["params"])
  tic = time.perf_counter()
  state = train(config, args.workdir)
  train_s = time.perf_counter() - tic
  after = scores(state["params"])
  every = args.every or max(1, config.train.steps // 10)
  table = loss_table(args.workdir, every)
  compiles = [m for m in read_metrics(args.workdir) if m.get("event") == "compile"]
  step_s = float(np.median([m["step_seconds"] for m in read_metrics(args.workdir) if "step_seconds" in m]))

  print(f"\ntrained {config.train.steps} steps in {train_s:.1f} s ({len(compiles)} compiles, "
        f"{sum(m['seconds'] for m in compiles):.1f} s; median step {1e3 * step_s:.1f} ms)")
  print(f"\n{'step':>6} {'loss':>8} {'min':>8} {'max':>8}  keeps")
  for r in table:
    print(f"{r['step']:>6} {r['loss']:>8.4f} {r['min']:>8.4f} {r['max']:>8.4f}  "
          f"{', '.join(f'{k:g}' for k in r['keeps'])}")
  tasks = [t for t in ("all", *TASKS) if t in next(iter(after.values()))]
  points = reference_points(heldout, seen, cfg.in_channels)
  print(f"\nPSNR (dB) of generated targets vs ground truth ({args.sample_steps} Euler steps), before / after "
        "training")
  print(f"{'':<30}" + "".join(f"{t:>20}" for t in tasks))
  print(f"{'':<30}" + "".join(f"{'before':>10}{'after':>10}" for _ in tasks))
  for key in after:
    print(f"{key:<30}" + "".join(f"{before[key][t]:>10.2f}{after[key][t]:>10.2f}" for t in tasks))
  for name, groups in points.items():
    print(f"{'held-out ' + name:<30}" + "".join(f"{groups[t]:>20.2f}" for t in tasks))

  path = plot(args.workdir, table, f"{os.path.basename(args.config)}: lr {config.train.lr:g}, "
                                   f"{config.data.world.count} examples, batch {config.train.batch_size}")
  with open(os.path.join(args.workdir, "learn_world.json"), "w") as f:
    json.dump(dict(config=args.config, overrides=args.overrides, steps=config.train.steps, train_seconds=train_s,
                   median_step_seconds=step_s, compiles=len(compiles), loss_table=table, psnr_before=before,
                   psnr_after=after, reference_points=points, sample_steps=args.sample_steps,
                   eval_examples=n, device=jax.devices()[0].device_kind), f, indent=1)
  print(f"\nwrote {path} and learn_world.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
