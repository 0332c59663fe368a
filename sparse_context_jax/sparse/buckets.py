"""The bucket ladder: static capacities for the kept reference tokens (method.md section 2.3).

XLA compiles one program per shape. A request's kept-token count is rounded UP to a rung of a fixed ladder of
keep ratios, and the slots beyond the real budget become padding (masked out of attention). The number of
compiled programs for a workload is then at most (ladder length) x (distinct target and reference sizes x batch
sizes), whatever keep ratios or adaptive budgets the requests ask for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sparse_context_jax.sparse.select import fixed_budget

DEFAULT_RATIOS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)


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

  def bucket_for(self, budgets: Sequence[int], tokens: Sequence[int]) -> float:
    """The smallest rung whose capacities hold every reference's budget (budgets: max over the batch)."""
    if len(budgets) != len(tokens):
      raise ValueError(f"{len(budgets)} budgets for {len(tokens)} references")
    for ratio in self.ratios:
      if all(c >= k for c, k in zip(self.capacities(ratio, tokens), budgets)):
        return ratio
    raise ValueError(f"budgets {tuple(budgets)} exceed the reference sizes {tuple(tokens)}")
