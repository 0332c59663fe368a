"""TPU chips and topologies: published per-chip numbers, and topology names in both forms (`v5e:2x2`, `v5e-4`).

A topology name `CHIP:AxB[xC]` gives the chip grid; `CHIP-N` counts chips for v5e and v6e and TensorCores (two per
chip) for v4 and v5p, as Cloud TPU accelerator types do. Devices come from libtpu's compile-only topology
description: one per chip (v4 in megacore mode), so nothing here needs a TPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip numbers (HBM, bf16 peak, HBM and inter-chip (ICI, bidirectional) bandwidth) and the HBM the
  compiler lets a program use (`usable_bytes`, from its out-of-memory messages with libtpu 0.0.42)."""

  name: str
  hbm_bytes: int
  usable_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  dims: int               # 2 (2D torus) or 3 (3D torus)
  cores_per_chip: int     # what the `CHIP-N` form counts per chip
  aliases: tuple[str, ...] = ()


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, int(30.75 * GiB), 275e12, 1200e9, 300e9, 3, 2),
    "v5e": Chip("v5e", 16 * GiB, int(15.75 * GiB), 197e12, 819e9, 400e9, 2, 1, ("v5litepod",)),
    "v5p": Chip("v5p", 95 * GiB, int(95.74 * GiB), 459e12, 2765e9, 600e9, 3, 2),
    "v6e": Chip("v6e", 32 * GiB, int(31.25 * GiB), 918e12, 1640e9, 800e9, 2, 1),
}
EXAMPLES = "v5e:2x2, v5e-4, v5p:2x2x2, v5p-128, v4:2x2x1, v6e-64"


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    """The `CHIP:AxB[xC]` form libtpu takes."""
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """The `CHIP-N` form."""
    return f"{self.chip.name}-{self.chips * self.chip.cores_per_chip}"

  def devices(self) -> list:
    """Compile-only TPU devices of this topology (one per chip)."""
    # libtpu looks for a TPU VM's metadata; on any other machine these tell it there is none to look for. Compiling
    # touches no chip, so several planning processes may load libtpu at once (it takes a lock file otherwise).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    host = tuple(min(2, s) for s in self.shape[:2]) + (1,)
    chip_config = "megacore" if self.chip.name == "v4" else "default"
    return list(topologies.get_topology_desc(platform="tpu", topology_name=self.name, chip_config_name=chip_config,
                                            chips_per_host_bounds=host, num_slices=1).devices)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual slice shape of `chips` chips (a power of two): sides as equal as possible, ascending, a 1 last."""
  k = chips.bit_length() - 1
  sides = sorted(2 ** (k // dims + (i < k % dims)) for i in range(dims))
  return tuple(s for s in sides if s > 1) + tuple(s for s in sides if s == 1)


def parse_topology(name: str) -> Topology:
  """`v5e:2x2` / `v5p:2x2x2` or `v5e-4` / `v5p-16` (-> v5p:2x2x2); ValueError naming the valid forms."""
  bad = ValueError(f"unknown TPU topology {name!r}; expected CHIP:AxB[xC] or CHIP-N with CHIP one of "
                   f"{', '.join(CHIPS)} (e.g. {EXAMPLES})")
  m = re.fullmatch(r"([a-z0-9]+)(?::(\d+(?:x\d+)*)|-(\d+))", name.strip().lower())
  if not m:
    raise bad
  chip = next((c for c in CHIPS.values() if m.group(1) in (c.name, *c.aliases)), None)
  if chip is None:
    raise bad
  if m.group(2):
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != chip.dims or any(s <= 0 for s in shape):
      raise ValueError(f"topology {name!r}: {chip.name} slices are {chip.dims}-D grids of chips (e.g. "
                       f"{chip.name}:{'x'.join(['2'] * chip.dims)})")
    return Topology(chip, shape)
  n = int(m.group(3))
  if n <= 0 or n % chip.cores_per_chip or (n // chip.cores_per_chip) & (n // chip.cores_per_chip - 1):
    per = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    raise ValueError(f"topology {name!r}: {chip.name}-N counts {per}; expected a power of two"
                     f"{' >= 2' if chip.cores_per_chip == 2 else ''} (e.g. {chip.name}-{8 * chip.cores_per_chip})")
  return Topology(chip, _grid(n // chip.cores_per_chip, chip.dims))
