"""The command line: help, the main job on a small setting, user errors as one line."""

from __future__ import annotations

import re
import subprocess
import sys

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


def test_demo_runs_dense_and_sparse():
  r = _run("demo", "--hidden", "128", "--depth", "1", "1", "--grid", "4", "--refs", "2", "--txt", "8",
           "--repeats", "2", "--keep", "0.5", "--skip-presets")
  assert r.returncode == 0, r.stderr
  assert "dense" in r.stdout and "sparse, keep 0.5" in r.stdout
  # image tokens: 16 target + 2 x 16 reference dense; sparse keeps 8 per reference (and 6 in the second example)
  assert re.search(r"^dense\s+48 \(\s*48, 48\)", r.stdout, re.M)
  assert re.search(r"^sparse, keep 0.5\s+32 \(\s*32, 28\)", r.stdout, re.M)
  diff = float(re.search(r"max \|diff\| = (\S+)", r.stdout).group(1))
  assert diff <= 1e-5


@pytest.mark.parametrize("args, message", [
    (("demo", "--keep", "1.5"), "--keep 1.5 (expected a ratio in (0, 1])"),
    (("demo", "--hidden", "100"), "--hidden 100 (expected a positive multiple of 128"),
])
def test_user_errors_are_one_line(args, message):
  r = _run(*args)
  assert r.returncode == 2
  assert r.stderr.strip() == f"error: {message}" or r.stderr.strip().startswith(f"error: {message}")
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
