"""`plan --search`: mesh shapes (data x fsdp x tensor), remat policies and scan / unrolled layers of a config on a
topology, ranked by the roofline step time (`estimate.py`), the fastest compiled until some fit.

The estimate needs no compile: XLA's FLOP count depends on the remat policy only (one lowering each) and the
collectives on the mesh. Memory does need one, so candidates are compiled in rank order (scan before unrolled at
equal estimates: it compiles faster) until `fits_wanted` fit, skipping those a compiled one shows cannot fit (the
same remat and layers with no less data and tensor parallelism); the rest keep their estimate and no memory.
"""

from __future__ import annotations

import dataclasses

from sparse_context_jax.plan.chips import Topology
from sparse_context_jax.plan.estimate import Estimate, estimate
from sparse_context_jax.plan.train import RungPlan, _step_flops, drawable_rungs, largest_grid, plan_rung
from sparse_context_jax.train import config as run_config
from sparse_context_jax.train.objective import ladder

REMATS = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass
class Candidate:
  mesh: tuple[int, int, int]
  remat: str
  scan: bool
  estimate: Estimate
  plan: RungPlan | None = None     # compiled: memory known

  def overrides(self) -> list[str]:
    return [f"--config.mesh='{self.mesh}'", f"--config.model.remat={self.remat}",
            f"--config.model.scan_layers={self.scan}"]


def meshes(config, cfg, chips: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) with product `chips`, powers of two, tensor dividing the heads, data x fsdp dividing
  the micro-batch."""
  micro = config.train.batch_size // config.train.grad_accum
  out = []
  t = 1
  while t <= chips:
    if cfg.num_heads % t == 0:
      rest = chips // t
      d = 1
      while d <= rest:
        f = rest // d
        if d * f * t == chips and micro % (d * f) == 0:
          out.append((d, f, t))
        d *= 2
    t *= 2
  return out


def search(config, topology: Topology, *, fits_wanted: int = 1, max_compiles: int = 6, remats=REMATS,
           on_candidate=None) -> list[Candidate]:
  cfg = run_config.model_config(config)
  ratio = max(drawable_rungs(config.objective))   # the most tokens: the rung that decides memory
  grid = largest_grid(config)
  rung = ladder(config.objective).at(ratio, (grid,) * config.data.max_refs)
  seq = config.data.txt_len + rung.length(grid[0] * grid[1])
  flops = {r: _step_flops(config, cfg, rung, grid, r) for r in remats}
  model_flops = flops["none"] if "none" in flops else _step_flops(config, cfg, rung, grid, "none")
  rows = []
  for mesh in meshes(config, cfg, topology.chips):
    for remat in remats:
      c = run_config.apply_overrides(config.copy_and_resolve_references(), [f"mesh={mesh}", f"model.remat={remat}"])
      e = estimate(c, cfg, topology, mesh, flops[remat], model_flops, seq)
      rows += [Candidate(mesh, remat, scan, e) for scan in (True, False)]
  rows.sort(key=lambda c: (c.estimate.step_seconds, not c.scan, c.mesh[2], c.mesh[0]))   # ties: pure FSDP first
  devices, fitting, compiled, too_big = topology.devices(), 0, 0, []
  for c in rows:
    if fitting >= fits_wanted or compiled >= max_compiles:
      break
    # A remat policy and layer mode that ran out of memory on a mesh run out on every mesh with no less data
    # parallelism (replicated parameters) and no less tensor parallelism (at a fixed global batch, more examples
    # per chip): not compiled, left unknown. Pure FSDP, ranked first at equal estimates, rules out the most.
    if any(c.remat == r and c.scan == s and c.mesh[0] >= d and c.mesh[2] >= t for r, s, d, t in too_big):
      continue
    overrides = [f"mesh={c.mesh}", f"model.remat={c.remat}", f"model.scan_layers={c.scan}"]
    c.plan = plan_rung(run_config.apply_overrides(config.copy_and_resolve_references(), overrides), topology,
                       devices, ratio)
    compiled += 1
    fits = not c.plan.error and c.plan.total_bytes <= topology.chip.usable_bytes
    fitting += int(fits)
    if not fits:
      too_big.append((c.remat, c.scan, c.mesh[0], c.mesh[2]))
    if on_candidate is not None:
      on_candidate(c)
  return rows


def plot(rows: list[Candidate], path: str, title: str, hbm: int) -> None:
  """Estimated step time per candidate, in rank order; colour: fits, does not fit, not compiled."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colour = lambda c: ("lightgray" if c.plan is None else
                      "tab:green" if not c.plan.error and c.plan.total_bytes <= hbm else "tab:red")
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
  ax.bar(range(len(rows)), [c.estimate.step_seconds for c in rows], color=[colour(c) for c in rows])
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([f"{'x'.join(map(str, c.mesh))} {c.remat}{'' if c.scan else ' unrolled'}" for c in rows],
                     rotation=90, fontsize=6)
  ax.set_ylabel("estimated step time, s (roofline)")
  ax.set_title(title + "\ngreen: fits, red: does not, gray: not compiled", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
