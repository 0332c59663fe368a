"""kill -9 at random moments, three times, in a 60-step tiny run on the synthetic world; each time the run resumes
from its latest checkpoint. The final parameters, the loss curve and the data order equal (bitwise, on this CPU) an
uninterrupted run's; for a full fine-tune and for LoRA with dropout (whose masks come from the state's RNG)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sparse_context_jax.train import config as C
from sparse_context_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
OVERRIDES = ["objective.keep_low=0.25", "objective.keep_high=0.25", "objective.dense_prob=0.0",
             "log.progress=False", "log.every=1", "train.steps=60", "checkpoint.every=4", "checkpoint.keep=2"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
LORA = ["lora.rank=4", "lora.alpha=8.0", "lora.dropout=0.1"]


def _command(workdir: str, data: str, extra: list[str]) -> list[str]:
  return [sys.executable, "-m", "sparse_context_jax", "train", "--config", TINY, "--workdir", workdir] + \
      [f"--config.{o}" for o in OVERRIDES + extra + ["data.path=" + data]]


def _last_step(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = [line for line in f if '"loss"' in line]
  except FileNotFoundError:
    return 0
  return len(steps) and int(steps[-1].split('"step": ')[1].split(",")[0].split("}")[0])


def _kill_at(workdir: str, data: str, extra: list[str], step: int, rng: random.Random) -> int:
  """Starts the run, kill -9s it a random moment after it logged `step`; returns the last step it logged."""
  proc = subprocess.Popen(_command(workdir, data, extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          cwd=ROOT)
  deadline = time.monotonic() + 600
  while _last_step(workdir) < step:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline, "the run made no progress"
    time.sleep(0.01)
  time.sleep(rng.uniform(0.0, 0.15))   # somewhere inside a step, a metrics write or an async checkpoint save
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  return _last_step(workdir)


def _final(workdir: str, config) -> dict:
  from sparse_context_jax.train.loop import train
  state = train(config, workdir, stop_after=0)   # restores the latest checkpoint, runs no step
  assert int(state["step"]) == 60
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _curve(workdir: str) -> list[tuple]:
  return [(m["step"], m["loss"], m["grad_norm"], m["batch_crc32"]) for m in read_metrics(workdir) if "loss" in m]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_kill_minus_9_three_times_resumes_bitwise(tmp_path, extra):
  from sparse_context_jax.train.loop import dataset_path
  config = C.apply_overrides(C.load(TINY), OVERRIDES + extra)
  data = dataset_path(config, str(tmp_path))
  config = C.apply_overrides(config, ["data.path=" + data])
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  # The uninterrupted run goes on beside the killed ones (two cores).
  reference = subprocess.Popen(_command(straight, data, extra), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=ROOT)
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  logged = []
  for low, high in ((3, 15), (20, 34), (40, 54)):   # one kill in each window: every resume has work to redo
    logged.append(_kill_at(killed, data, extra, rng.randint(low, high), rng))
  last = subprocess.run(_command(killed, data, extra), env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert last.returncode == 0, last.stderr[-3000:]
  _, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, err.decode()[-3000:]

  note = f"seed {seed}, killed after logging steps {logged}"
  assert _curve(killed) == _curve(straight), note   # loss, grad norm and data order of steps 1..60, once each
  assert [s for s, *_ in _curve(killed)] == list(range(1, 61)), note
  a, b = _final(killed, config), _final(straight, config)
  assert a.keys() == b.keys()
  assert ("lora" in str(list(a))) == bool(extra)
  for k in a:   # params (and LoRA factors), optimizer state, RNG, step
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} ({note})")
