"""The command line: help, the main job on a small setting, user errors as one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from sparse_context_jax import PRESETS, count_params


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", *args], capture_output=True, text=True,
                        timeout=timeout)


def test_help_lists_commands():
  r = _run("--help")
  assert r.returncode == 0
  assert "demo" in r.stdout and "presets" in r.stdout


def test_presets_command_prints_every_preset_with_its_count():
  r = _run("presets")
  assert r.returncode == 0, r.stderr
  for name, cfg in PRESETS.items():
    assert re.search(rf"^{name}\s.*\s{count_params(cfg):,}\s", r.stdout, re.M), name


def test_demo_runs_dense_and_sparse(tmp_path):
  r = _run("demo", "--hidden", "128", "--depth", "1", "1", "--size", "64", "--refs", "2", "--txt", "8",
           "--repeats", "2", "--strategy", "edge", "--tau", "0.5", "--skip-presets", "--images", "2",
           "--out", str(tmp_path))
  assert r.returncode == 0, r.stderr
  # 16 target tokens + 2 references x 16 dense; the adaptive budgets fit a bucket of the ladder
  assert re.search(r"^dense\s+-\s+48 \(\s*48, 48\)", r.stdout, re.M), r.stdout
  assert re.search(r"^keep 1, padded path\s+1\s+48 \(\s*48, 48\)", r.stdout, re.M), r.stdout
  line = re.search(r"^edge, tau 0.5\s+(\S+)\s+(\d+) \(\s*(\d+), (\d+)\)", r.stdout, re.M)
  bucket, seq, valid = float(line.group(1)), int(line.group(2)), [int(line.group(3)), int(line.group(4))]
  assert seq == 16 + 2 * int(np.ceil(bucket * 16 - 1e-9)) and max(valid) <= seq < 48
  kept = json.loads(re.search(r"kept reference tokens per example: (\[.*\]) of 16", r.stdout).group(1))
  assert [16 + sum(k) for k in kept] == valid
  diff = float(re.search(r"max \|diff\| = (\S+)", r.stdout).group(1))
  assert diff <= 1e-5
  # batch generation: synthetic-world jobs, dense then sparse, PNGs written
  assert re.search(r"^dense\s+\[16, 16\]\s+\d", r.stdout, re.M) and re.search(r"^hybrid/saliency", r.stdout, re.M)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dense_0.png", "dense_1.png", "sparse_0.png", "sparse_1.png"]


@pytest.mark.parametrize("args, message", [
    (("demo", "--keep", "1.5"), "--keep 1.5 (expected a ratio in (0, 1])"),
    (("demo", "--hidden", "100"), "--hidden 100 (expected a positive multiple of 128"),
    (("demo", "--tau", "0"), "--tau 0.0 (expected a ratio in (0, 1])"),
    (("demo", "--size", "72"), "--size 72 (expected a positive multiple of 16)"),
])
def test_user_errors_are_one_line(args, message):
  r = _run(*args)
  assert r.returncode == 2
  assert r.stderr.strip() == f"error: {message}" or r.stderr.strip().startswith(f"error: {message}")
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
