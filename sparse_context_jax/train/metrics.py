"""Metrics of a run: `<workdir>/metrics.jsonl` (one JSON object per logged step and per event) and the same
numbers as TensorBoard scalars in `<workdir>/tensorboard/`.

    log = MetricsWriter(workdir, start_step=start)   # after resuming from the checkpoint of step `start`
    log.write({"step": 10, "loss": 0.5, "keep_histogram": {"0.25": 7, "1.0": 3}})
    log.write({"event": "compile", "step": 10, "seconds": 2.5})
    log.close()

A resumed run redoes the steps after its checkpoint: the writer drops their records from the JSON lines and has
TensorBoard purge them (`purge_step`), so both show each step once.
"""

from __future__ import annotations

import json
import numbers
import os
import time

import jax
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary


def _parse(text: str, path: str) -> list[dict]:
  """The records of a metrics file; a torn last line (a run killed mid-write) is dropped, any other bad line is
  an error."""
  lines = text.split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:   # no newline after it: the write was cut short
        break
      raise ValueError(f"{path}:{i + 1} is not a JSON line ({e})") from None
  return records


def _rewrite(path: str, records: list[dict]) -> None:
  """Replaces the file with `records`, atomically (a kill leaves the old or the new file, never half of one)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def scalars(record: dict) -> dict[str, float]:
  """The TensorBoard scalars of a record: every numeric field of a step record (tag = field name) and
  `keep_share/<rung>` (the share of steps so far at each keep-ratio rung, from "keep_histogram"); the "seconds" of
  a compile event as `compile_seconds`; nothing for other events or records without a step."""
  if "step" not in record:
    return {}
  if "event" in record:
    return {"compile_seconds": float(record["seconds"])} if record["event"] == "compile" else {}
  out = {k: float(v) for k, v in record.items() if k != "step" and _is_number(v)}
  histogram = record.get("keep_histogram") or {}
  total = sum(histogram.values())
  out.update({f"keep_share/{rung}": count / total for rung, count in histogram.items() if total})
  return out


class TensorBoardWriter:
  """Scalars into a TensorBoard event file in `logdir`, written synchronously: each `write` is on disk when it
  returns (tensorboardX's SummaryWriter queues events for a background thread and its flush does not wait for
  them, so a killed run could lose its last records).

  `purge_step`: TensorBoard hides the events of earlier files with a step >= purge_step (a SessionLog START event,
  as SummaryWriter(purge_step=...) writes it).
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    # The file name holds whole seconds only: a writer reopened within the second would overwrite the previous
    # file. A nanosecond suffix keeps names unique and in the order TensorBoard reads them.
    self._writer = EventsWriter(os.path.join(logdir, "events"), f".{time.time_ns()}")
    if purge_step is not None:
      self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                     session_log=SessionLog(status=SessionLog.START)))
    self._writer.flush()

  def write(self, step: int, values: dict[str, float]) -> None:
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
    self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricsWriter:
  """Writes on process 0 only (every process holds the same replicated metrics); a no-op elsewhere.

  `start_step`: the step the run (re)starts from (0 for a fresh run). Records of later steps, left by a run killed
  after its last checkpoint (or before its first one), are dropped from metrics.jsonl (records without a step are
  kept), and TensorBoard purges its events of steps > start_step. A torn last line is always dropped, so the next record starts a line.
  Each record is on disk in both formats when `write` returns: a killed run keeps what it wrote.
  """

  def __init__(self, workdir: str | os.PathLike, start_step: int = 0):
    workdir = os.fspath(workdir)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        text = f.read()
      records = _parse(text, self.path)
      kept = [r for r in records if "step" not in r or r["step"] <= start_step]
      if len(kept) != len(records) or (text and not text.endswith("\n")):
        _rewrite(self.path, kept)
    self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=start_step + 1)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    values = scalars(record)
    if values:
      self._tb.write(int(record["step"]), values)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, without a torn last line."""
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  with open(path) as f:
    return _parse(f.read(), path)
