"""The paper's experiments in miniature, on the synthetic world (exact ground truth), from real runs on this machine.

  python launch/paper_table.py --out paper_out            # the full experiment (about 24 minutes on 2 CPU cores)
  python launch/paper_table.py --out /tmp/quick --quick   # a smoke run of every stage (about 2 minutes)

Stages (the train program, configs/world.py with 1..4 references: the most the settings evaluate):
  1   a base model trained with dense references (the "pretrained reference-conditioned model");
  2a  from the stage-1 weights, the same number of steps with dense references (the control);
  2b  from the stage-1 weights, the same number of steps with random-ratio dropping (the paper's recipe).
Stage 2 runs once per --seeds seed (the headline rows report their mean and spread; the other rows use seed 0).

Each model generates held-out examples (a world of another seed) through the Generator, per setting (editing with
its one reference; composition with 1, 2 and 4 references): dense, every strategy at keep 1/2 .. 1/16, and the
adaptive budget (hybrid scores, --taus). Per row: PSNR against the exact ground truth, PSNR against the same
model's dense output from the same noise, reference tokens kept, XLA's FLOP ratio of one denoiser step (dense /
sparse, padded bucket included) and the measured sampling speed-up (stage 2b, random tokens and the adaptive rows,
timed after compiling). Two reference points: copying the first reference, and the mean training target.

Writes to --out: table.md, results.json, quality_vs_keep.png (one panel per setting, stage 2b, a line per
strategy), stages_vs_keep.png (stages 1 / 2a / 2b, task-aware and random), budget.png (quality against kept tokens:
fixed keep vs adaptive tau) and grid.png (references | ground truth | dense | task-aware 1/4 | random 1/4 | kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_context_jax import compile_cache  # noqa: E402
from sparse_context_jax.convert import load_model  # noqa: E402
from sparse_context_jax.convert.checkpoint import save  # noqa: E402
from sparse_context_jax.convert.run import open_run  # noqa: E402
from sparse_context_jax.data.world import caption_words  # noqa: E402
from sparse_context_jax.encoders import records  # noqa: E402
from sparse_context_jax.generate import Generator, Pipeline  # noqa: E402
from sparse_context_jax.generate.heldout import (at_tokens, copy_psnr, example_grid, heldout_examples,  # noqa: E402
                                                 mean_target, psnr_to, run_world, world_jobs)
from sparse_context_jax.generate.jobs import TASK_STRATEGY  # noqa: E402
from sparse_context_jax.model.jitted import JittedMMDiT  # noqa: E402
from sparse_context_jax.model.positions import token_grid  # noqa: E402
from sparse_context_jax.sparse import STRATEGIES, SparseRequest  # noqa: E402
from sparse_context_jax.train import config as run_config  # noqa: E402
from sparse_context_jax.train.loop import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "configs", "world.py")
SETTINGS = (("editing", 1), ("composition", 1), ("composition", 2), ("composition", 4))
KEEPS = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
DENSE = ["objective.ladder=(1.0,)", "objective.dense_prob=1.0"]
FULL = dict(stage1=4000, stage2=1500, examples=32, keeps=KEEPS, strategies=STRATEGIES, taus=(0.3, 0.5, 0.7),
            settings=SETTINGS, ladder=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0))
QUICK = dict(stage1=300, stage2=40, examples=4, keeps=(1 / 4,), strategies=("random", "hybrid", "attention"),
             taus=(0.5,), settings=(("editing", 1), ("composition", 2)), ladder=(1 / 4, 1.0))


def dropping(ladder) -> list[str]:
  """The paper's recipe: a keep ratio drawn per step from the rungs, dense with probability 0.1."""
  return [f"objective.ladder={tuple(ladder)}", f"objective.keep_low={min(ladder)}", "objective.dense_prob=0.1"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="output folder (the runs go to OUT/runs)")
  p.add_argument("--quick", action="store_true", help="a smoke run: few steps, examples, keeps and strategies")
  p.add_argument("--seeds", type=int, default=None, help="stage-2 seeds (default 3, --quick 1)")
  p.add_argument("--sample-steps", type=int, default=16, help="Euler steps per generated image")
  p.add_argument("--batch", type=int, default=8, help="generation batch size")
  args, args.overrides = run_config.parse_with_overrides(p, argv)
  args.plan = dict(QUICK if args.quick else FULL)
  args.seeds = args.seeds or (1 if args.quick else 3)
  return args


def stage_config(args, stage: str, seed: int, init: str | None = None):
  plan = args.plan
  refs = max(n for _, n in plan["settings"])   # the world holds as many references as the settings evaluate
  overrides = [f"data.world.max_refs={refs}", f"data.max_refs={refs}", f"data.txt_len={caption_words(refs)}",
               f"seed={seed}", "log.progress=False",
               f"train.steps={plan['stage1' if stage == '1' else 'stage2']}",
               *(dropping(plan["ladder"]) if stage == "2b" else DENSE), *([f"model.init={init}"] if init else []),
               *args.overrides]
  config = run_config.apply_overrides(run_config.load(WORLD), overrides)
  config.checkpoint.every = config.train.steps
  run_config.validate(config, jax.device_count())
  return config


def train_stage(args, stage: str, seed: int, init: str | None = None) -> tuple[str, float]:
  """(run folder, seconds): the run of `stage`, trained now unless already complete in OUT/runs."""
  workdir = os.path.join(args.out, "runs", f"stage{stage}-seed{seed}")
  config = stage_config(args, stage, seed, init)
  done = os.path.join(workdir, "done.json")
  if os.path.isfile(done):
    with open(done) as f:
      return workdir, json.load(f)["seconds"]
  tic = time.perf_counter()
  train(config, workdir)
  seconds = time.perf_counter() - tic
  with open(done, "w") as f:
    json.dump({"seconds": seconds}, f)
  print(f"  stage {stage} seed {seed}: {config.train.steps} steps in {seconds:.1f} s", flush=True)
  return workdir, seconds


class Evaluator:
  """One model's generations of the held-out settings (`examples` and their ground truth `truths`, per setting),
  with its dense outputs kept for the PSNR against them."""

  def __init__(self, args, run_dir: str, config, examples: dict, truths: dict):
    opened = open_run(run_dir)
    self.args, self.config, self.examples, self.truths, self.cfg = args, config, examples, truths, opened.model
    self.image = records.image_encoder(opened.encoders["image"])
    self.text = records.text_encoder(opened.encoders["text"])
    self.gen = Generator(Pipeline(load_model(run_dir), self.image), batch_size=args.batch)
    self.size = tuple(config.data.world.size)
    self.dense: dict = {}

  def run(self, setting, name: str, request, repeats: int = 0) -> dict:
    examples = self.examples[setting]
    out = run_world(self.gen, self.text, world_jobs(self.cfg, examples, request, self.args.sample_steps),
                    txt_len=self.config.data.txt_len, batch=self.args.batch, repeats=repeats)
    if name == "dense":
      self.dense[setting] = out.pixels
    grid = token_grid(self.size)
    total = sum(len(ex.references) for ex in examples) * grid[0] * grid[1]
    return dict(psnr=float(np.mean(psnr_to(out.pixels, self.truths[setting]))),
                psnr_dense=float(np.mean(psnr_to(out.pixels, self.dense[setting]))) if name != "dense" else None,
                kept=out.kept / total, sequences=sorted({r.prepared.sequence for r in out.results}),
                jobs_at=[r.prepared.sequence for r in out.results],
                sampling_s=out.sampling_s, results=out.results)


def requests(plan, task: str) -> dict:
  """name -> (example, index) -> SparseRequest, for one task."""
  base = TASK_STRATEGY[task][1]
  out = {"dense": lambda ex, i: SparseRequest("random", keep=1.0, seed=i)}
  for strategy in plan["strategies"]:
    for keep in plan["keeps"]:
      out[f"{strategy} {keep:g}"] = (lambda s, k: lambda ex, i: SparseRequest(s, keep=k, hybrid_base=base,
                                                                              seed=i))(strategy, keep)
  for tau in plan["taus"]:
    out[f"hybrid tau {tau:g}"] = (lambda t: lambda ex, i: SparseRequest("hybrid", tau=t, hybrid_base=base,
                                                                        seed=i))(tau)
  return out


def step_flops(model, config, sequence: int, n_target: int) -> float:
  """XLA's FLOPs of one denoiser call at `sequence` image tokens (target + reference slots), batch 1."""
  cfg = model.config
  T = config.data.txt_len
  return JittedMMDiT(model).flops(
      img=jnp.zeros((1, sequence, cfg.in_channels)), txt=jnp.zeros((1, T, cfg.context_dim)),
      timesteps=jnp.zeros((1,)), img_ids=jnp.zeros((1, sequence, cfg.n_axes)),
      txt_ids=jnp.zeros((1, T, cfg.n_axes)), img_lengths=jnp.full((1,), n_target, jnp.int32))


def baselines(image, config, examples: dict, truths: dict) -> dict:
  """Per setting: PSNR of copying the first reference and of the mean training target."""
  mean, out = mean_target(image, config.data.world), {}
  for setting, exs in examples.items():
    truth = truths[setting]
    out[setting] = {"copy": float(np.mean(copy_psnr(image, exs, truth))),
                    "mean target": float(np.mean(psnr_to([mean] * len(exs), truth)))}
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  compile_cache.enable()
  os.makedirs(args.out, exist_ok=True)
  plan, tic = args.plan, time.perf_counter()
  try:
    config = stage_config(args, "1", 0)   # the stage-1 config: it also sets the held-out world
  except run_config.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  print("training", flush=True)
  s1, s1_seconds = train_stage(args, "1", 0)
  init = os.path.join(args.out, "runs", "stage1-weights")
  if not os.path.isdir(init):
    save(load_model(s1), init)
  runs, seconds = {"1": {0: s1}}, {"1": s1_seconds}
  for seed in range(args.seeds):
    for stage in ("2a", "2b"):
      runs.setdefault(stage, {})[seed], seconds[f"{stage} seed {seed}"] = train_stage(args, stage, seed, init)

  w = config.data.world
  examples = {(task, refs): heldout_examples(w, plan["examples"], seed=w.seed + 1, refs=refs, tasks=(task,))
              for task, refs in plan["settings"]}
  image = records.image_encoder(open_run(s1).encoders["image"])   # every stage's run records the same encoders
  truths = {s: [at_tokens(image, ex.target, tuple(w.size)) for ex in exs] for s, exs in examples.items()}
  rows, headline = [], {}
  print("evaluating", flush=True)
  for stage in ("1", "2a", "2b"):
    for seed, run_dir in runs[stage].items():
      ev = Evaluator(args, run_dir, config, examples, truths)
      for setting in examples:
        task, refs = setting
        reqs = requests(plan, task)
        if seed:   # the other seeds: the headline rows only
          reqs = {n: r for n, r in reqs.items() if n in ("dense", "random 0.25", "hybrid 0.25")}
        for name, request in reqs.items():
          timed = stage == "2b" and seed == 0 and (name == "dense" or name.startswith(("random", "hybrid tau")))
          r = ev.run(setting, name, request, repeats=2 if timed else 0)
          results = r.pop("results")
          if stage == "2b" and seed == 0 and name in ("dense", "hybrid 0.25", "random 0.25"):
            headline.setdefault(setting, {})[name] = results
          rows.append(dict(stage=stage, seed=seed, task=task, refs=refs, run=name, timed=timed, **r))
      print(f"  stage {stage} seed {seed}: {sum(1 for r in rows if r['stage'] == stage and r['seed'] == seed)} "
            f"rows ({time.perf_counter() - tic:.0f} s)", flush=True)

  # FLOP ratios (XLA's count of one denoiser call, averaged over the jobs' buckets) and measured speed-ups
  model = load_model(s1)
  n_target = token_grid(tuple(w.size))[0] * token_grid(tuple(w.size))[1]
  flops = {n: step_flops(model, config, n, n_target) for n in sorted({n for r in rows for n in r["sequences"]})}
  job_flops = lambda r: float(np.mean([flops[n] for n in r.pop("jobs_at")]))   # adaptive rows mix buckets
  for r in rows:
    r["flops"] = job_flops(r)
  dense_rows = {(r["stage"], r["seed"], r["task"], r["refs"]): r for r in rows if r["run"] == "dense"}
  for r in rows:
    d = dense_rows[(r["stage"], r["seed"], r["task"], r["refs"])]
    r["flop_ratio"] = d["flops"] / r["flops"]
    r["speedup"] = d["sampling_s"] / r["sampling_s"] if r["timed"] and d["timed"] else None

  points = baselines(image, config, examples, truths)
  total = time.perf_counter() - tic
  summary = dict(plan={k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()}, seeds=args.seeds,
                 overrides=args.overrides, train_seconds=seconds, total_seconds=total,
                 device=jax.devices()[0].device_kind,
                 baselines={f"{t} {n}": v for (t, n), v in points.items()}, rows=rows)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  table = markdown(rows, points, args)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  plots(rows, points, args)
  shown = [list(headline)[0], list(headline)[-1]]   # three examples of the first and of the last setting
  pick = lambda name: [r for s in shown for r in headline[s][name][:3]]
  grid = example_grid(image, [ex for s in shown for ex in examples[s][:3]],
                      {"dense": pick("dense"), "task-aware 0.25": pick("hybrid 0.25"),
                       "random 0.25": pick("random 0.25")}, overlay="task-aware 0.25")
  with open(os.path.join(args.out, "grid.png"), "wb") as f:
    f.write(grid)
  print(f"wrote {args.out}/table.md, results.json, quality_vs_keep.png, stages_vs_keep.png, budget.png, grid.png "
        f"in {total:.0f} s")
  return 0


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def markdown(rows, points, args) -> str:
  """The headline table (mean and spread over the stage-2 seeds) and the full table of seed 0."""
  lines = [f"Synthetic world, held-out examples, PSNR (dB) against the exact ground truth; {args.seeds} stage-2 "
           "seed(s).", "", "Reference points:", "", "| setting | copy first reference | mean training target |",
           "|---|---|---|"]
  lines += [f"| {t} x{n} | {v['copy']:.2f} | {v['mean target']:.2f} |" for (t, n), v in points.items()]
  lines += ["", "Headline (mean ± std over seeds):", "",
            "| setting | stage | dense | task-aware 1/4 | random 1/4 |", "|---|---|---|---|---|"]
  for (task, refs) in points:
    for stage in ("1", "2a", "2b"):
      cells = []
      for name in ("dense", "hybrid 0.25", "random 0.25"):
        v = [r["psnr"] for r in rows if (r["task"], r["refs"], r["stage"], r["run"]) == (task, refs, stage, name)]
        cells.append("-" if not v else f"{np.mean(v):.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}")
      lines.append(f"| {task} x{refs} | {stage} | " + " | ".join(cells) + " |")
  lines += ["", "Every row (seed 0): PSNR vs ground truth / vs the same model's dense output, kept share of reference "
            "tokens, FLOP ratio of a denoiser step (dense / this), measured sampling speed-up (stage 2b, timed rows):",
            "", "| setting | run | stage 1 | stage 2a | stage 2b | kept | FLOP ratio | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
  by = {(r["task"], r["refs"], r["run"], r["stage"]): r for r in rows if r["seed"] == 0}
  names = list(dict.fromkeys(r["run"] for r in rows))
  for (task, refs) in points:
    for name in names:
      cells = [by.get((task, refs, name, s)) for s in ("1", "2a", "2b")]
      if cells[2] is None:
        continue
      q = lambda c: "-" if c is None else f"{c['psnr']:.2f} / {_fmt(c['psnr_dense'], '.2f')}"
      lines.append(f"| {task} x{refs} | {name} | {q(cells[0])} | {q(cells[1])} | {q(cells[2])} | "
                   f"{cells[2]['kept']:.3f} | {cells[2]['flop_ratio']:.2f} | {_fmt(cells[2]['speedup'], '.2f')} |")
  return "\n".join(lines) + "\n"


def plots(rows, points, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  settings = list(points)
  seed0 = [r for r in rows if r["seed"] == 0]
  pick = lambda **kw: [r for r in seed0 if all(r[k] == v for k, v in kw.items())]

  def panels(title):
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.4), dpi=110, squeeze=False)
    fig.suptitle(title, fontsize=9)
    return fig, axes[0]

  def finish(fig, axes, name, xlabel):
    for ax, (task, refs) in zip(axes, settings):
      ax.axhline(points[(task, refs)]["copy"], color="gray", ls=":", lw=1, label="copy first reference")
      ax.axhline(points[(task, refs)]["mean target"], color="gray", ls="--", lw=1, label="mean training target")
      ax.set_title(f"{task}, {refs} reference(s)", fontsize=8)
      ax.set_xlabel(xlabel, fontsize=8)
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs ground truth (dB)", fontsize=8)
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, name))
    plt.close(fig)

  keeps = sorted(args.plan["keeps"]) + [1.0]
  fig, axes = panels("stage 2b (random-ratio fine-tune): quality against keep ratio, per strategy")
  for ax, (task, refs) in zip(axes, settings):
    dense = pick(stage="2b", task=task, refs=refs, run="dense")[0]["psnr"]
    for i, s in enumerate(args.plan["strategies"]):
      ys = [pick(stage="2b", task=task, refs=refs, run=f"{s} {k:g}")[0]["psnr"] for k in keeps[:-1]] + [dense]
      ax.plot(keeps, ys, "o-", ms=3, color=f"C{i}", label=s)
    ax.set_xscale("log", base=2)
  finish(fig, axes, "quality_vs_keep.png", "keep ratio")

  fig, axes = panels("stages: dense base (1), dense fine-tune (2a), random-ratio fine-tune (2b)")
  for ax, (task, refs) in zip(axes, settings):
    for i, stage in enumerate(("1", "2a", "2b")):
      dense = pick(stage=stage, task=task, refs=refs, run="dense")[0]["psnr"]
      for s, ls in (("hybrid", "-"), ("random", "--")):
        ys = [pick(stage=stage, task=task, refs=refs, run=f"{s} {k:g}")[0]["psnr"] for k in keeps[:-1]] + [dense]
        label = f"stage {stage}, {'task-aware' if s == 'hybrid' else s}"
        ax.plot(keeps, ys, "o" + ls, ms=3, color=f"C{i}", label=label)
    ax.set_xscale("log", base=2)
  finish(fig, axes, "stages_vs_keep.png", "keep ratio")

  fig, axes = panels("stage 2b: fixed keep ratio (hybrid) vs adaptive budget (hybrid, tau)")
  for ax, (task, refs) in zip(axes, settings):
    fixed = [pick(stage="2b", task=task, refs=refs, run=f"hybrid {k:g}")[0] for k in keeps[:-1]]
    fixed.append(pick(stage="2b", task=task, refs=refs, run="dense")[0])
    adaptive = [pick(stage="2b", task=task, refs=refs, run=f"hybrid tau {t:g}")[0] for t in args.plan["taus"]]
    ax.plot([r["kept"] for r in fixed], [r["psnr"] for r in fixed], "o-", ms=3, label="fixed keep")
    ax.plot([r["kept"] for r in adaptive], [r["psnr"] for r in adaptive], "s", ms=5, label="adaptive tau")
    ax.set_xscale("log", base=2)
  finish(fig, axes, "budget.png", "share of reference tokens kept")


if __name__ == "__main__":
  sys.exit(main())
