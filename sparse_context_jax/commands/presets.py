"""The released FLUX architectures: sizes, parameter counts and weight memory (computed abstractly)."""

from __future__ import annotations

from sparse_context_jax.model import PRESETS, count_params


def add_arguments(parser) -> None:
  del parser


def table() -> str:
  head = f"{'preset':<18} {'family':<6} {'hidden':>6} {'heads':>5} {'double':>6} {'single':>6} {'context':>7} " \
         f"{'guid.':>5} {'params':>15} {'bf16 GiB':>8} {'fp32 GiB':>8}"
  rows = [head, "-" * len(head)]
  for name, c in PRESETS.items():
    n = count_params(c)
    rows.append(f"{name:<18} {c.family:<6} {c.hidden_size:>6} {c.num_heads:>5} {c.depth_double:>6} "
                f"{c.depth_single:>6} {c.context_dim:>7} {'yes' if c.guidance_embed else 'no':>5} {n:>15,} "
                f"{2 * n / 2**30:>8.2f} {4 * n / 2**30:>8.2f}")
  return "\n".join(rows)


def run(args) -> int:
  del args
  print(table())
  return 0
