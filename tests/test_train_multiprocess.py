"""Multi-process training: 2 processes x 4 fake CPU devices (jax.distributed over 127.0.0.1, started by
launch/train_local.sh) train exactly as 1 process with 8 devices, and their checkpoint restores in 1 process on
another mesh and continues identically; for a full fine-tune and for LoRA with dropout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sparse_context_jax.train import config as C
from sparse_context_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
FAST = ["objective.keep_low=0.25", "objective.keep_high=0.25", "objective.dense_prob=0.0", "log.progress=False",
        "data.world.count=16", "train.warmup_steps=1", "train.steps=12", "checkpoint.every=5"]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
LORA = ["lora.rank=4", "lora.alpha=8.0", "lora.dropout=0.1"]

# One process with 8 devices: `run` trains (or resumes) a workdir to `stop_after` more steps on `mesh`, `restore`
# only restores; both print the trained parameters (and the frozen base of a LoRA run).
SINGLE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from sparse_context_jax.train import config as C
    from sparse_context_jax.train.loop import train
    out = {{}}
    for name, workdir, mesh, more in {runs!r}:
      c = C.apply_overrides(C.load({tiny!r}), {overrides!r} + ["mesh=" + mesh])
      state = train(c, workdir, stop_after=more)
      trained = {{k: state[k] for k in ("params", "lora") if k in state}}
      out[name] = {{jax.tree_util.keystr(p): np.asarray(v).tolist()
                   for p, v in jax.tree_util.tree_leaves_with_path(trained)}}
      out[name + "/mesh"] = dict(next(iter(jax.tree.leaves(state["params"]))).sharding.mesh.shape)
    print("RESULT" + json.dumps(out))
""")


def _single(runs, overrides):
  script = SINGLE.format(root=ROOT, tiny=TINY, overrides=overrides, runs=runs)
  proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
  assert a.keys() == b.keys()
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert np.max(np.abs(x - y)) <= tol * max(np.max(np.abs(y)), 1e-12), k


def _curve(workdir) -> dict[int, tuple[float, int]]:
  return {m["step"]: (m["loss"], m["batch_crc32"]) for m in read_metrics(workdir) if "loss" in m}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_two_processes_equal_one_and_restore_on_another_mesh(tmp_path, extra):
  from sparse_context_jax.train.loop import dataset_path
  data = dataset_path(C.apply_overrides(C.load(TINY), FAST), str(tmp_path))   # one world for every run
  overrides = FAST + extra + ["data.path=" + data]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")

  # 1 process, 8 devices, mesh 2x4x1: 10 steps, then 2 more.
  ref = _single([("ref10", single, "(2, 4, 1)", 10), ("ref12", single, "(2, 4, 1)", None)], overrides)

  # 2 processes x 4 devices, the same mesh over all 8: 10 steps (a checkpoint at step 10).
  cmd = ["bash", os.path.join(ROOT, "launch", "train_local.sh"), "2", "4", "--config", TINY, "--workdir", multi,
         "--steps", "10"] + [f"--config.{o}" for o in overrides + ["mesh=(2, 4, 1)"]]
  proc = subprocess.run(cmd, env={**os.environ, "SCJ_PYTHON": sys.executable}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["10", "5"]

  # Its checkpoint in 1 process on another mesh (2x2x2): restored exactly, then 2 more steps.
  got = _single([("restored", multi, "(2, 2, 2)", 0), ("continued", multi, "(2, 2, 2)", None)], overrides)
  assert got["restored/mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert any("['lora']" in k for k in ref["ref10"]) == bool(extra)
  _close(got["restored"], ref["ref10"])
  _close(got["continued"], ref["ref12"])
  # The same data in the same order, the same loss at every step (10 from 2 processes, 2 after the restore).
  a, b = _curve(single), _curve(multi)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for step in a:
    assert a[step][1] == b[step][1], step
    assert abs(a[step][0] - b[step][0]) <= 1e-5 * abs(a[step][0]), (step, a[step][0], b[step][0])


@pytest.mark.slow
def test_sigterm_to_one_process_saves_on_every_process_and_stops(tmp_path):
  """Preemption that reaches one worker first: both processes save the same step, then exit with the preempted
  status (75), which the launcher returns."""
  import signal
  import time
  from sparse_context_jax.train.loop import dataset_path
  data = dataset_path(C.apply_overrides(C.load(TINY), FAST), str(tmp_path))
  workdir = str(tmp_path / "run")
  overrides = FAST + ["data.path=" + data, "train.steps=400", "checkpoint.every=1000", "mesh=(2, 4, 1)"]
  cmd = ["bash", os.path.join(ROOT, "launch", "train_local.sh"), "2", "4", "--config", TINY, "--workdir", workdir] + \
      [f"--config.{o}" for o in overrides]
  launcher = subprocess.Popen(cmd, env={**os.environ, "SCJ_PYTHON": sys.executable}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not any(m.get("step", 0) >= 3 and "loss" in m for m in
                (read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else [])):
    assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
    time.sleep(0.05)
  found = subprocess.run(["pgrep", "-f", "--", f"--workdir {workdir} .*--process-id 1$"], capture_output=True, text=True)
  pids = [int(p) for p in found.stdout.split()]
  assert len(pids) == 1, found
  os.kill(pids[0], signal.SIGTERM)   # process 1 only; process 0 hears of it through the per-step agreement
  out, err = launcher.communicate(timeout=600)
  assert launcher.returncode == 75, out[-2000:] + err[-3000:]
  assert "preempted at step" in err, err[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  preempted = [m["step"] for m in read_metrics(workdir) if m.get("event") == "preempted"]
  assert len(saved) == 1 and preempted == saved and 3 <= saved[0] < 400
