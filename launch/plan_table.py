"""Markdown table of `plan --json` files: one row per file (its worst rung).

  python launch/plan_table.py plans/*.json
"""

from __future__ import annotations

import json
import sys


def row(path: str) -> str:
  d = json.load(open(path))
  worst = max(d["rungs"], key=lambda r: r["total_bytes"])
  e = worst.get("estimate") or {}
  gib = lambda n: f"{n / 2**30:.1f}"
  step = f"{e['step_seconds']:.2f}" if e else "-"
  mfu = f"{e['mfu']:.0%}" if e else "-"
  mem = gib(worst["total_bytes"]) + (" (compiler OOM)" if worst["error"] else "")
  usable = gib(d.get("usable_bytes", d["hbm_bytes"]))
  return (f"| {d.get('preset', '?')} | {d.get('max_refs', '?')} | {d['accelerator_type']} | {d.get('batch_size', '?')} "
          f"| {d.get('attention_impl') or 'default'} | {d.get('remat', '?')} | {tuple(d['mesh'])} | {mem} / {usable} "
          f"| {'yes' if worst['fits'] else 'no'} | {worst['flops'] / 1e15:.1f} | {step} | {mfu} "
          f"| {worst['compile_seconds']:.0f} |")


def main(paths: list[str]) -> int:
  print("| model | refs | slice | batch | attention | remat | mesh (d, f, t) | GiB/chip (of usable HBM) | fits | PFLOP/step "
        "| est. step s | est. MFU | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for p in paths:
    print(row(p))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
