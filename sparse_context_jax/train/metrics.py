"""Metrics to `<workdir>/metrics.jsonl`: one JSON object per logged step (and one per compile)."""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
  """Appends JSON lines on process 0 only (every process holds the same replicated metrics)."""

  def __init__(self, workdir: str | os.PathLike, start_step: int = 0):
    self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    self.active = jax.process_index() == 0

  def write(self, record: dict) -> None:
    if self.active:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


  def close(self) -> None:
    pass


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  with open(os.path.join(os.fspath(workdir), "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
