"""Markdown table of `plan --json` files: one row per file (its worst rung).

  python launch/plan_table.py plans/*.json          # the table of these files
  python launch/plan_table.py --cells DIR           # the README's cells, from DIR/CELL.json
  python launch/plan_table.py --cells DIR --compile [--jobs 2]  # first compiles the missing ones (launch/plan.sh)

A cell is (preset, references, slice, remat, attention, LoRA rank): a fine-tune from configs/base.py (full at rank 0,
else LoRA adapters of that rank over the frozen base) at 1024x1024, 512 text tokens, one example per chip, pure FSDP,
the dense rung (`--rung 1`: the most tokens of every rung).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

# chips of each slice (v5p-N counts TensorCores, two a chip): the global batch, one example per chip
CHIPS = {"v5e-16": 16, "v5e-64": 64, "v5e-256": 256, "v5p-32": 16, "v5p-128": 64, "v6e-16": 16, "v6e-64": 64}

# (preset, refs, slice, remat, attention, LoRA rank)
CELLS = [
    ("flux2-klein-4b", 1, "v5e-16", "full", "auto", 0),
    ("flux2-klein-4b", 1, "v5e-64", "full", "auto", 0),
    ("flux2-klein-4b", 1, "v5e-256", "full", "auto", 0),
    ("flux2-klein-4b", 1, "v5p-32", "dots_no_batch", "auto", 0),
    ("flux2-klein-4b", 1, "v5p-128", "dots_no_batch", "auto", 0),
    ("flux2-klein-4b", 1, "v6e-16", "dots_no_batch", "auto", 0),
    ("flux2-klein-4b", 1, "v6e-64", "dots_no_batch", "auto", 0),
    ("flux2-klein-4b", 1, "v5e-16", "full", "auto", 16),
    ("flux2-klein-4b", 1, "v5e-64", "full", "auto", 16),
    ("flux2-klein-4b", 1, "v5e-256", "full", "auto", 16),
    ("flux2-klein-4b", 1, "v5p-32", "full", "auto", 16),
    ("flux2-klein-4b", 1, "v5p-128", "full", "auto", 16),
    ("flux2-klein-4b", 1, "v6e-16", "full", "auto", 16),
    ("flux2-klein-4b", 1, "v6e-64", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v5e-16", "full", "auto", 0),
    ("flux2-klein-4b", 4, "v5e-64", "full", "auto", 0),
    ("flux2-klein-4b", 4, "v5e-256", "full", "auto", 0),
    ("flux2-klein-4b", 4, "v5p-32", "dots_no_batch", "auto", 0),
    ("flux2-klein-4b", 4, "v5p-128", "dots_no_batch", "auto", 0),
    ("flux2-klein-4b", 4, "v6e-16", "full", "auto", 0),
    ("flux2-klein-4b", 4, "v6e-64", "full", "auto", 0),
    ("flux2-klein-4b", 4, "v5e-16", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v5e-64", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v5e-256", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v5p-32", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v5p-128", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v6e-16", "full", "auto", 16),
    ("flux2-klein-4b", 4, "v6e-64", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v5e-16", "full", "auto", 0),
    ("flux2-klein-9b", 1, "v5e-64", "full", "auto", 0),
    ("flux2-klein-9b", 1, "v5e-256", "full", "auto", 0),
    ("flux2-klein-9b", 1, "v5p-32", "dots_no_batch", "auto", 0),
    ("flux2-klein-9b", 1, "v5p-128", "dots_no_batch", "auto", 0),
    ("flux2-klein-9b", 1, "v6e-16", "full", "auto", 0),
    ("flux2-klein-9b", 1, "v6e-64", "full", "auto", 0),
    ("flux2-klein-9b", 1, "v5e-16", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v5e-64", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v5e-256", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v5p-32", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v5p-128", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v6e-16", "full", "auto", 16),
    ("flux2-klein-9b", 1, "v6e-64", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v5e-16", "full", "auto", 0),
    ("flux2-klein-9b", 4, "v5e-64", "full", "auto", 0),
    ("flux2-klein-9b", 4, "v5e-256", "full", "auto", 0),
    ("flux2-klein-9b", 4, "v5p-32", "dots_no_batch", "auto", 0),
    ("flux2-klein-9b", 4, "v5p-32", "full", "auto", 0),
    ("flux2-klein-9b", 4, "v5p-32", "dots_no_batch", "xla", 0),
    ("flux2-klein-9b", 4, "v5p-128", "dots_no_batch", "auto", 0),
    ("flux2-klein-9b", 4, "v6e-16", "full", "auto", 0),
    ("flux2-klein-9b", 4, "v6e-64", "full", "auto", 0),
    ("flux2-klein-9b", 4, "v5e-16", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v5e-64", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v5e-256", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v5p-32", "dots_no_batch", "auto", 16),
    ("flux2-klein-9b", 4, "v5p-32", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v5p-128", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v6e-16", "full", "auto", 16),
    ("flux2-klein-9b", 4, "v6e-64", "full", "auto", 16),
    ("flux2-dev", 1, "v5e-256", "full", "auto", 0),
    ("flux2-dev", 1, "v5p-32", "full", "auto", 0),
    ("flux2-dev", 1, "v5p-128", "full", "auto", 0),
    ("flux2-dev", 1, "v6e-64", "full", "auto", 0),
    ("flux2-dev", 1, "v5p-32", "full", "auto", 16),
    ("flux2-dev", 4, "v5p-128", "full", "auto", 0),
]


def cell_name(cell) -> str:
  preset, refs, slice_, remat, attention, lora = cell
  return f"{preset}_r{refs}_{slice_}_{remat}_{attention}" + (f"_lora{lora}" if lora else "")


def cell_args(cell) -> list[str]:
  preset, refs, slice_, remat, attention, lora = cell
  return ["--config", "configs/base.py", "--topology", slice_, f"--config.model.preset={preset}",
          "--config.data.resolution=1024", f"--config.data.max_refs={refs}", "--config.data.txt_len=512",
          f"--config.train.batch_size={CHIPS[slice_]}", f"--config.model.remat={remat}",
          f"--config.model.attention_impl={attention}", "--config.mesh=(1, -1, 1)", f"--config.lora.rank={lora}",
          "--rung", "1"]


def compile_cell(cell, path: str) -> None:
  """`launch/plan.sh` for one cell, writing its JSON; exit status 3 (does not fit) is an answer."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(["bash", os.path.join(root, "launch", "plan.sh"), *cell_args(cell), "--json", path], cwd=root)
  if r.returncode not in (0, 3):
    raise SystemExit(f"plan of {cell_name(cell)} failed (exit {r.returncode})")


def row(path: str) -> str:
  d = json.load(open(path))
  worst = max(d["rungs"], key=lambda r: r["total_bytes"])
  e = worst.get("estimate") or {}
  gib = lambda n: f"{n / 2**30:.1f}"
  step = f"{e['step_seconds']:.2f}" if e else "-"
  mfu = f"{e['mfu']:.0%}" if e else "-"
  mem = gib(worst["total_bytes"]) + (" (compiler OOM)" if worst["error"] else "")
  usable = gib(d.get("usable_bytes", d["hbm_bytes"]))
  model = d.get("preset", "?") + (f" LoRA r{d['lora_rank']}" if d.get("lora_rank") else "")
  return (f"| {model} | {d.get('max_refs', '?')} | {d['accelerator_type']} | {d.get('batch_size', '?')} "
          f"| {d.get('attention_impl') or 'default'} | {d.get('remat', '?')} | {tuple(d['mesh'])} | {mem} / {usable} "
          f"| {'yes' if worst['fits'] else 'no'} | {worst['flops'] / 1e15:.1f} | {step} | {mfu} "
          f"| {worst['compile_seconds']:.0f} |")


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="*", help="plan --json files")
  p.add_argument("--cells", metavar="DIR", help="the README's cells, DIR/CELL.json each")
  p.add_argument("--compile", action="store_true", help="compile the cells missing from --cells DIR first")
  p.add_argument("--jobs", type=int, default=1, help="cells compiled at once (about one core and 1-4 GB each)")
  args = p.parse_args(argv)
  paths = list(args.paths)
  if args.cells:
    os.makedirs(args.cells, exist_ok=True)
    cells = {cell: os.path.join(args.cells, cell_name(cell) + ".json") for cell in CELLS}
    if args.compile:   # XLA compiles a program mostly on one thread: --jobs compiles at once use that many cores
      missing = [(c, p) for c, p in cells.items() if not os.path.exists(p)]
      with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda cp: compile_cell(*cp), missing))
    for cell, path in cells.items():
      if os.path.exists(path):
        paths.append(path)
      else:
        print(f"not compiled: {cell_name(cell)} (--compile)", file=sys.stderr)
  print("| model | refs | slice | batch | attention | remat | mesh (d, f, t) | GiB/chip (of usable HBM) | fits | PFLOP/step "
        "| est. step s | est. MFU | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for path in paths:
    print(row(path))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
