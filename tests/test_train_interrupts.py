"""Interrupts and resumes that say what they did: Ctrl-C saves like SIGTERM and exits with the preempted status, a
resume refuses a config that trains something else and logs what it may change, the keep-ratio histogram is part of
the checkpoint, and a run that never started leaves no workdir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sparse_context_jax import cli
from sparse_context_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
FAST = ["objective.keep_low=0.25", "objective.keep_high=1.0", "objective.dense_prob=0.0", "log.progress=False",
        "data.world.count=16", "train.warmup_steps=1", "log.every=1"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
LORA = ["lora.rank=4", "lora.alpha=8.0", "lora.dropout=0.1"]


def _args(workdir, *overrides) -> list[str]:
  return ["train", "--config", TINY, "--workdir", str(workdir)] + [f"--config.{o}" for o in FAST + list(overrides)]


def _one_line_error(capsys, rc) -> str:
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_ctrl_c_saves_and_exits_preempted_then_the_same_command_resumes(tmp_path, extra):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "sparse_context_jax"] + _args(workdir, *extra, "train.steps=400",
                                                             "checkpoint.every=1000")
  proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while not any("loss" in m for m in (read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else [])):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert len(saved) == 1 and 1 <= saved[0] < 400
  assert f"preempted at step {saved[0]}, saved; rerun the same command to resume" in err
  # The same command (with the end brought nearer) resumes; the keep-ratio histogram counts every step once.
  steps = saved[0] + 3
  rc = cli.main(_args(workdir, *extra, f"train.steps={steps}", "checkpoint.every=1000"))
  assert rc == 0
  last = [m for m in read_metrics(workdir) if "loss" in m][-1]
  assert last["step"] == steps and sum(last["keep_histogram"].values()) == steps
  event = [m for m in read_metrics(workdir) if m.get("event") == "resume_config"]
  assert event and event[0]["changed"]["train.steps"] == [400, steps]


def test_resume_refuses_another_training_config_and_warns_of_a_new_schedule(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(_args(workdir, "train.steps=4") + ["--steps", "2"]) == 0
  capsys.readouterr()
  err = _one_line_error(capsys, cli.main(_args(workdir, "train.steps=4", "train.lr=0.5", "model.arch.depth_single=2")))
  assert "train.lr 0.001 -> 0.5" in err and "model.arch.depth_single 1 -> 2" in err and "new --workdir" in err
  assert cli.main(_args(workdir, "train.steps=3")) == 0
  err = capsys.readouterr().err
  assert "warning: train.steps 4 -> 3 changes the cosine learning-rate schedule" in err


@pytest.mark.parametrize("override, message", [
    ("data.path={missing}", "is not a folder (expected the output of build-dataset"),
])
def test_a_run_that_never_starts_leaves_no_workdir(override, message, tmp_path, capsys):
  rc = cli.main(_args(tmp_path / "run", override.format(missing=tmp_path / "no-data")))
  assert message in _one_line_error(capsys, rc)
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_one_line_and_untouched(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("keep me")
  assert "is a file, not a folder" in _one_line_error(capsys, cli.main(_args(path)))
  assert path.read_text() == "keep me"


def test_unknown_config_argument_names_the_valid_ones(tmp_path, capsys):
  rc = cli.main(["train", "--config", TINY + ":flux3", "--workdir", str(tmp_path / "run")])
  assert "configs/tiny.py:flux3: the argument is empty, flux2 or flux1" in _one_line_error(capsys, rc)
  assert not (tmp_path / "run").exists()
