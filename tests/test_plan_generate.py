"""`plan --generate`: the generator's sampler compiled for a virtual TPU topology, weights replicated."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="plans need the TPU runtime (libtpu, in requirements-test.txt)")

from sparse_context_jax.model import preset  # noqa: E402
from sparse_context_jax.plan.chips import parse_topology  # noqa: E402
from sparse_context_jax.plan.generate import largest_batch  # noqa: E402

TINY = preset("flux2-klein-4b").replace(in_channels=128, out_channels=128, num_heads=2, head_dim=128, depth_double=1,
                                        depth_single=1, context_dim=256)


def test_tiny_sampler_fits_and_doubles_to_the_limit():
  best, plans = largest_batch(TINY, parse_topology("v5e:2x2"), limit=2, resolution=64, refs=1, keep=0.5,
                              dtype=jnp.bfloat16, txt_len=8, steps=2)
  assert best == 2 and [p.batch_per_chip for p in plans] == [1, 2]
  small, large = plans
  assert 0 < small.total_bytes < large.total_bytes and not small.error
  assert large.argument_bytes > small.argument_bytes   # the batch grows, the replicated weights do not
