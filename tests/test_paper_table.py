"""launch/paper_table.py --quick: every stage trains through the train program, every strategy row is generated
through the Generator, and the table, JSON, plots and grid come from those runs. The paper's claims are not
asserted at this scale; that the dense model learned the composition task (it beats copying the first reference)
is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_experiment_writes_its_table_plots_and_grid_from_real_runs(tmp_path):
  out = tmp_path / "paper"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "paper_table.py"), "--out", str(out), "--quick"],
                     capture_output=True, text=True, timeout=900,
                     env={**os.environ, "SCJ_COMPILE_CACHE": str(tmp_path / "xla")})
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  rows = results["rows"]
  plan = results["plan"]
  # every stage, setting and request has its row, with its metrics
  names = {"dense", *(f"{s} {k:g}" for s in plan["strategies"] for k in plan["keeps"]),
           *(f"hybrid tau {t:g}" for t in plan["taus"])}
  for stage in ("1", "2a", "2b"):
    for task, refs in plan["settings"]:
      got = {row["run"]: row for row in rows if (row["stage"], row["task"], row["refs"]) == (stage, task, refs)}
      assert set(got) == names, (stage, task, refs, sorted(got))
      assert got["dense"]["kept"] == 1.0 and got["dense"]["flop_ratio"] == 1.0
      for name, row in got.items():
        if name != "dense":
          assert 0 < row["kept"] < 1 and row["flop_ratio"] > 1 and row["psnr_dense"] > 0, (name, row)
  # the trained stages exist as runs, and stage 2 started from stage 1's weights
  for stage in ("1", "2a", "2b"):
    assert (out / "runs" / f"stage{stage}-seed0" / "done.json").is_file()
  assert (out / "runs" / "stage1-weights" / "config.json").is_file()
  # the dense model beats copying the first reference on composition (the quick scale's own level)
  dense = {row["task"]: row["psnr"] for row in rows if row["stage"] == "2b" and row["run"] == "dense"}
  assert dense["composition"] > results["baselines"]["composition 2"]["copy"], (dense, results["baselines"])
  table = (out / "table.md").read_text()
  assert "| editing x1 | 2b |" in table and "hybrid tau" in table
  for png in ("quality_vs_keep.png", "stages_vs_keep.png", "budget.png", "grid.png"):
    with Image.open(out / png) as im:
      assert im.size[0] > 200 and im.size[1] > 100, (png, im.size)
