"""The benchmarks' one plot: measured and FLOP-ideal speedup against the keep ratio, one colour per series."""

from __future__ import annotations


def speedup_plot(series: dict[str, list[tuple[float, float, float]]], path: str, title: str, ylabel: str,
                 xlabel: str = "keep ratio of reference tokens") -> None:
  """series: label -> [(keep, measured speedup, ideal speedup), ...]; writes a PNG to `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  keeps = sorted({k for points in series.values() for k, _, _ in points})
  for i, (label, points) in enumerate(series.items()):
    k, measured, ideal = zip(*sorted(points))
    ax.plot(k, measured, "o-", color=f"C{i}", label=f"{label}: measured")
    ax.plot(k, ideal, "--", color=f"C{i}", alpha=0.6, label=f"{label}: FLOP ideal")
  ax.set_xscale("log")
  ax.set_xticks(keeps, labels=[f"{k:g}" for k in keeps])
  ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
