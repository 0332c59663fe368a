"""The bucket ladder and its rungs: static capacities for the kept reference tokens.

XLA compiles one program per shape. A request's kept-token count is rounded UP to a rung of a fixed ladder of
keep ratios, and the slots beyond the real budget become padding (masked out of attention). The number of
compiled programs for a workload is then at most (ladder length) x (distinct target and reference sizes x batch
sizes), whatever keep ratios or adaptive budgets the requests ask for.

The rung is the host-side plan of a packing: `ladder.rung(budgets, grids)` for requested budgets, or
`ladder.at(ratio, grids)` for a ratio of the ladder (training). Everything that turns a ratio into a token count
goes through `Rung` (capacities) and `select.fixed_budget`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sparse_context_jax.sparse.select import fixed_budget

DEFAULT_RATIOS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)
Grid = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Rung:
  """One rung for one set of references: the static shape of their packed tokens.

  ratio: the ladder's keep ratio; grids: each reference's (h, w) token grid; capacities: slots per reference,
  `fixed_budget(ratio, h * w)`. Hashable: programs take it as a static argument.
  """

  ratio: float
  grids: tuple[Grid, ...]
  capacities: tuple[int, ...]

  @property
  def tokens(self) -> tuple[int, ...]:
    """Dense tokens per reference."""
    return tuple(h * w for h, w in self.grids)

  @property
  def slots(self) -> int:
    """Reference slots in the packed sequence (kept tokens plus padding)."""
    return sum(self.capacities)

  def length(self, n_target: int) -> int:
    """Image tokens of the packed sequence `[target | reference slots]`."""
    return n_target + self.slots


def rung_at(ratio: float, grids: Sequence[Grid]) -> Rung:
  """The rung of any keep ratio (`BucketLadder.at` for the ladder's own): capacities `fixed_budget(ratio, h w)`."""
  grids = tuple((int(h), int(w)) for h, w in grids)
  return Rung(float(ratio), grids, tuple(fixed_budget(ratio, h * w) for h, w in grids))


@dataclasses.dataclass(frozen=True)
class BucketLadder:
  """Ascending keep ratios in (0, 1]; the last is 1 so that every request fits."""

  ratios: tuple[float, ...] = DEFAULT_RATIOS

  def __post_init__(self):
    r = tuple(float(x) for x in self.ratios)
    object.__setattr__(self, "ratios", r)
    if not r or list(r) != sorted(set(r)) or r[0] <= 0 or r[-1] != 1.0:
      raise ValueError(f"bucket ladder {r} must be strictly ascending ratios in (0, 1] ending with 1")

  def __len__(self) -> int:
    return len(self.ratios)

  def capacities(self, ratio: float, tokens: Sequence[int]) -> tuple[int, ...]:
    """Slots per reference at a rung: ceil(ratio * M_i)."""
    return tuple(fixed_budget(ratio, m) for m in tokens)

  def at(self, ratio: float, grids: Sequence[Grid]) -> Rung:
    """The rung of one of the ladder's ratios for references of these grids."""
    if float(ratio) not in self.ratios:
      raise ValueError(f"keep ratio {ratio} is not a rung of the ladder {self.ratios}")
    return rung_at(ratio, grids)

  def bucket_for(self, budgets: Sequence[int], tokens: Sequence[int]) -> float:
    """The smallest rung whose capacities hold every reference's budget (budgets: max over the batch)."""
    if len(budgets) != len(tokens):
      raise ValueError(f"{len(budgets)} budgets for {len(tokens)} references")
    for ratio in self.ratios:
      if all(c >= k for c, k in zip(self.capacities(ratio, tokens), budgets)):
        return ratio
    raise ValueError(f"budgets {tuple(budgets)} exceed the reference sizes {tuple(tokens)}")

  def rung(self, budgets: Sequence[int], grids: Sequence[Grid]) -> Rung:
    """The smallest rung that holds `budgets` (per reference, the max over the batch) for these grids."""
    return self.at(self.bucket_for(budgets, [h * w for h, w in grids]), grids)
