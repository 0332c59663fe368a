"""Progress: plain lines (no carriage returns) when the output is not a terminal, at most one per interval."""

from __future__ import annotations

import io

from sparse_context_jax.progress import ProgressLines, progress


def test_lines_off_a_terminal():
  out = io.StringIO()
  with ProgressLines(4 << 20, "convert ae.safetensors", "B", file=out, every=0) as bar:
    bar.update(3 << 20)
    bar.set_postfix(tensors="1/4")
    bar.update(1 << 20)
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue() and len(lines) == 3   # two updates, and the closing line
  assert lines[0].startswith("convert ae.safetensors: ") and "75% 3.0 MiB/4.0 MiB" in lines[0]
  assert lines[-1].endswith("tensors=1/4")


def test_lines_are_rate_limited_and_closing_prints_once():
  out = io.StringIO()
  bar = ProgressLines(1000, "train", "step", initial=10, file=out, every=3600)
  for _ in range(990):
    bar.update(1)
  bar.close()
  bar.close()
  assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
  assert out.getvalue().startswith("train: 100% 1000/1000 step (")


def test_off_a_terminal_the_factory_gives_lines_and_disabled_gives_silence(capsys):
  assert isinstance(progress(10, "x"), ProgressLines)   # pytest's stderr is not a terminal
  bar = progress(10, "x", enabled=False)
  bar.update(10)
  bar.close()
  assert capsys.readouterr().err == ""
