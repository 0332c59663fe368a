"""Metrics: JSON lines and TensorBoard event files that parse back, and a resume that drops the redone steps."""

from __future__ import annotations

import json
import os
import struct

import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from sparse_context_jax.train.metrics import MetricsWriter, read_metrics


def read_events(path: str) -> list[Event]:
  """One event file, its TFRecord framing read by hand: length (8 bytes), its crc, data, the data's crc."""
  events = []
  with open(path, "rb") as f:
    data = f.read()
  at = 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    at += 12
    events.append(Event.FromString(data[at:at + length]))
    at += length + 4
  assert at == len(data), f"{path}: trailing bytes"
  return events


def tensorboard_view(workdir) -> dict[str, dict[int, float]]:
  """tag -> {step: value} as TensorBoard shows it: files in name order, a SessionLog START at step s hides the
  earlier events of steps >= s."""
  logdir = os.path.join(workdir, "tensorboard")
  files = sorted(f for f in os.listdir(logdir) if "tfevents" in f)
  points: list[tuple[str, int, float]] = []
  for name in files:
    for e in read_events(os.path.join(logdir, name)):
      if e.HasField("session_log") and e.session_log.status == SessionLog.START:
        points = [p for p in points if p[1] < e.step]
      for v in e.summary.value:
        points.append((v.tag, e.step, v.simple_value))
  view: dict[str, dict[int, float]] = {}
  for tag, step, value in points:
    assert step not in view.setdefault(tag, {}), f"{tag} logged twice at step {step}"
    view[tag][step] = value
  return view


def step_record(step: int, loss: float) -> dict:
  return {"step": step, "loss": loss, "grad_norm": 2.0 * step, "lr": 1e-3, "keep": 0.25, "step_seconds": 0.5,
          "examples_per_s": 16.0, "tokens_per_s": 800.0, "keep_histogram": {"0.25": step, "1.0": step}}


def test_tensorboard_scalars_parse_back(tmp_path):
  with MetricsWriter(tmp_path) as log:
    log.write({"event": "compile", "step": 0, "keep": 0.25, "grid": [4, 4], "seconds": 3.5})
    for step in (1, 2, 3):
      log.write(step_record(step, loss=1.0 / step))
    log.write({"event": "preempted", "step": 3})
    # What is written is on disk before close: a killed run keeps it.
    assert tensorboard_view(tmp_path)["loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
  view = tensorboard_view(tmp_path)
  assert set(view) == {"loss", "grad_norm", "lr", "keep", "step_seconds", "examples_per_s", "tokens_per_s",
                       "keep_share/0.25", "keep_share/1.0", "compile_seconds"}
  assert view["grad_norm"] == {1: 2.0, 2: 4.0, 3: 6.0}
  assert view["tokens_per_s"] == {1: 800.0, 2: 800.0, 3: 800.0}
  assert view["keep_share/0.25"] == {1: 0.5, 2: 0.5, 3: 0.5}
  assert view["compile_seconds"] == {0: 3.5}
  assert view["lr"] == pytest.approx({1: 1e-3, 2: 1e-3, 3: 1e-3})
  assert [r.get("event", r["step"]) for r in read_metrics(tmp_path)] == ["compile", 1, 2, 3, "preempted"]


def test_resume_drops_the_redone_steps_and_a_torn_line(tmp_path):
  with MetricsWriter(tmp_path) as log:
    log.write({"event": "compile", "step": 0, "seconds": 1.0})
    for step in range(1, 6):
      log.write(step_record(step, loss=float(step)))
  with open(tmp_path / "metrics.jsonl", "a") as f:   # a run killed with -9 in the middle of a line
    f.write('{"step": 6, "loss": 0.12')
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]

  with MetricsWriter(tmp_path, start_step=3) as log:   # resumed from the checkpoint of step 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    log.write({"event": "compile", "step": 3, "seconds": 2.0})
    for step in (4, 5):
      log.write(step_record(step, loss=10.0 * step))
  text = (tmp_path / "metrics.jsonl").read_text()
  records = [json.loads(line) for line in text.splitlines()]   # every line whole again
  assert [(r["step"], r.get("loss")) for r in records] == \
      [(0, None), (1, 1.0), (2, 2.0), (3, 3.0), (3, None), (4, 40.0), (5, 50.0)]
  view = tensorboard_view(tmp_path)
  assert view["loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}
  assert view["grad_norm"] == {1: 2.0, 2: 4.0, 3: 6.0, 4: 8.0, 5: 10.0}


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n' * 7 + '{"step": 8, "lo\n{"step": 9}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:8 is not a JSON line"):
    read_metrics(tmp_path)   # corruption, not a kill: never silently dropped
  with pytest.raises(ValueError, match="metrics.jsonl:8 is not a JSON line"):
    MetricsWriter(tmp_path, start_step=3)


def test_a_fresh_start_drops_what_a_run_killed_before_its_first_checkpoint_logged(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"event": "compile", "step": 0, "seconds": 1.0}\n'
                                          '{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  with MetricsWriter(tmp_path) as log:   # no checkpoint: the run starts again at step 0
    log.write({"step": 1, "loss": 5.0})
  assert read_metrics(tmp_path) == [{"event": "compile", "step": 0, "seconds": 1.0}, {"step": 1, "loss": 5.0}]
  assert tensorboard_view(tmp_path)["loss"] == {1: 5.0}
