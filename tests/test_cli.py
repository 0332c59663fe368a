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


@pytest.mark.parametrize("args, message", [
    (("demo", "--keep", "1.5"), "--keep 1.5 (expected a ratio in (0, 1])"),
    (("demo", "--examples", "0"), "--examples 0 (expected > 0)"),
    (("demo", "--steps", "0"), "--steps 0 (expected > 0)"),
    (("demo", "--config.train.nope=1"), "unknown config key"),
])
def test_user_errors_are_one_line(args, message):
  r = _run(*args)
  assert r.returncode == 2
  assert r.stderr.strip() == f"error: {message}" or r.stderr.strip().startswith(f"error: {message}")
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
