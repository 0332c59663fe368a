"""The main job (`demo`) at a tiny scale: it trains the world model through the train program, caches it, loads it
on the next call without training, never takes an interrupted training for a model, and prints its table and
writes its grid from the trained weights."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sparse_context_jax.commands import demo
from sparse_context_jax.convert.run import open_run
from sparse_context_jax.generate.heldout import heldout_examples, world_jobs
from sparse_context_jax.train.metrics import read_metrics

STEPS = 6
# One reference per example (fewer programs to compile), a 16-example world, 6 steps.
TINY = ["--steps", str(STEPS), "--examples", "2", "--sample-steps", "2", "--batch", "2", "--repeats", "1",
        "--rows", "2", "--skip-presets", "--config.data.world.count=16", "--config.data.world.max_refs=1",
        "--config.data.max_refs=1", "--config.log.every=2"]
ROW = r"^{}\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+)/(\d+)\s+(\d+\.\d)\s+(\d+\.\d\d)x\s+(\d+\.\d\d)$"


def _env(tmp_path) -> dict:
  """The compilation cache on, in the test's own folder: the later calls read the first one's programs."""
  return {**os.environ, "SCJ_COMPILE_CACHE": str(tmp_path / "xla")}


def _demo(cache, out, *extra):
  r = subprocess.run([sys.executable, "-m", "sparse_context_jax", "demo", *TINY, "--cache", str(cache), "--out",
                      str(out), *extra], capture_output=True, text=True, timeout=900, env=_env(cache.parent))
  assert r.returncode == 0, r.stderr
  return r.stdout


def _table(stdout: str) -> dict:
  rows = {}
  for name in ("dense", "task-aware, keep 0.25", "random, keep 0.25"):
    m = re.search(ROW.format(re.escape(name)), stdout, re.M)
    assert m, (name, stdout)
    rows[name] = [float(g) for g in m.groups()]
  for name, key in (("copy first reference", "copy"), ("mean training target", "mean")):
    m = re.search(rf"^{name}\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)$", stdout, re.M)
    assert m, (name, stdout)
    rows[key] = [float(g) for g in m.groups()]
  return rows


def _model(cache):
  runs = [p for p in cache.iterdir() if p.name.startswith("world-") and p.is_dir()]
  assert len(runs) == 1, sorted(p.name for p in cache.iterdir())
  return runs[0]


def test_demo_trains_once_then_loads_and_retrains_an_incomplete_cache(tmp_path):
  cache, out = tmp_path / "cache", tmp_path / "out"
  first = _demo(cache, out)
  assert "training the world model" in first and "trained now in" in first
  run_dir = _model(cache)
  assert (run_dir / demo.COMPLETE).is_file() and not list(cache.glob("*.partial-*"))
  # the model is a real run of the train program: every step taken and logged, its final step saved
  opened = open_run(run_dir)
  assert opened.step == STEPS and opened.encoders["image"]["kind"] == "pixel-tokens"
  assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(2, STEPS + 1, 2))
  table = _table(first)
  for name in ("dense", "task-aware, keep 0.25", "random, keep 0.25"):
    psnr, kept, total = table[name][0], table[name][3], table[name][4]
    assert 0 < psnr < 60 and 0 < kept <= total
    assert (kept == total) == (name == "dense")   # the sparse runs keep about a quarter
  assert table["dense"][6] == 1.0   # the speed-ups are relative to dense
  grid = Image.open(out / "grid.png")
  assert grid.mode == "RGB" and grid.size[0] > grid.size[1] > 0
  for run in ("dense", "task-aware", "random"):
    assert sorted(p.name for p in out.glob(f"{run}_*.png")) == [f"{run}_0.png", f"{run}_1.png"]
  # the dense PNG is the trained model's output: generated again by `generate --model RUN_DIR` from the same job
  args = _args(tmp_path)
  config = demo.world_config(args)
  examples = heldout_examples(config.data.world, args.examples, seed=config.data.world.seed + 1)
  jobs = world_jobs(opened.model, examples, demo._requests(args.keep)["dense"], args.sample_steps)
  _same_as_generate(tmp_path, run_dir, examples[0], jobs[0], out / "dense_0.png", config.data.txt_len)

  # second call: loaded from the cache, nothing trained, the same numbers
  metrics = (run_dir / "metrics.jsonl").read_bytes()
  second = _demo(cache, out)
  assert "training the world model" not in second and "loaded from the cache" in second
  assert (run_dir / "metrics.jsonl").read_bytes() == metrics
  assert {k: v[:3] for k, v in _table(second).items()} == {k: v[:3] for k, v in table.items()}

  # an interrupted cache (no completion marker, a scratch folder of a killed run) is trained again, not loaded
  (run_dir / demo.COMPLETE).unlink()
  (cache / f"{run_dir.name}.partial-12345" / "checkpoints").mkdir(parents=True)
  third = _demo(cache, out)
  assert "training the world model" in third and "loaded from the cache" not in third
  assert (run_dir / demo.COMPLETE).is_file() and not list(cache.glob("*.partial-*"))


def _args(tmp_path) -> argparse.Namespace:
  """The namespace the demo parses from TINY (for its job builder)."""
  from sparse_context_jax.cli import _Parser
  p = _Parser()
  demo.add_arguments(p)
  args, extra = p.parse_known_args(TINY + ["--cache", str(tmp_path / "cache")])
  args.extra = [a[len(demo.EXTRA_PREFIX):] for a in extra]
  return args


def _same_as_generate(tmp_path, run_dir, example, job, png, txt_len: int):
  """`generate --model RUN_DIR` on the demo's dense job of `example` writes the PNG the demo wrote (to rounding:
  its batch-mates differ)."""
  from sparse_context_jax.images import encode_png
  folder = tmp_path / "jobs"
  folder.mkdir()
  refs = []
  for i, pixels in enumerate(example.references):
    (folder / f"ref{i}.png").write_bytes(encode_png(pixels))
    refs.append(f"ref{i}.png")
  line = {"prompt": job.prompt, "references": refs, "task": example.task, "keep": 1.0, "size": list(job.size),
          "steps": job.steps, "seed": job.seed, "output": "dense.png"}
  (folder / "jobs.jsonl").write_text(json.dumps(line) + "\n")
  r = subprocess.run([sys.executable, "-m", "sparse_context_jax", "generate", str(folder / "jobs.jsonl"),
                      "--model", str(run_dir), "--max-sequence-length", str(txt_len), "--batch-size", "2"],
                     capture_output=True, text=True, timeout=600, env=_env(tmp_path))
  assert r.returncode == 0, r.stderr
  ours, theirs = (np.asarray(Image.open(p), np.int16) for p in (png, folder / "dense.png"))
  assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1


def test_an_interrupted_training_leaves_nothing_cached(tmp_path, monkeypatch):
  """A training stopped half-way (Ctrl-C) leaves no model folder and no scratch folder behind."""
  from sparse_context_jax.train import loop

  def interrupted(config, workdir, **kw):
    (demo.Path(workdir) / "checkpoints" / "2").mkdir(parents=True)   # what a run has written by then
    raise KeyboardInterrupt

  monkeypatch.setattr(loop, "train", interrupted)
  config = demo.world_config(_args(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    demo.trained_model(config, tmp_path)
  assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_the_model_hash_covers_config_seed_and_world_code(tmp_path, monkeypatch):
  args = _args(tmp_path)
  base = demo.model_hash(demo.world_config(args))
  assert demo.model_hash(demo.world_config(args)) == base
  for change in (dict(seed=1), dict(steps=STEPS + 1), dict(extra=args.extra + ["train.lr=1e-4"])):
    assert demo.model_hash(demo.world_config(argparse.Namespace(**{**vars(args), **change}))) != base, change
  code = tmp_path / "world.py"
  code.write_bytes(demo.WORLD_CODE.read_bytes() + b"\n# changed\n")
  monkeypatch.setattr(demo, "WORLD_CODE", code)
  assert demo.model_hash(demo.world_config(args)) != base
