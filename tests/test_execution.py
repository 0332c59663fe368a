"""Execution options change nothing but speed and memory: scan vs unrolled blocks, remat policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import as_jax, inputs, jax_model


def _forward_and_grads(name: str, **model_kw):
  graphdef, state = nnx.split(jax_model(name, **model_kw))
  x = as_jax(inputs(name))

  def loss(s):
    out = nnx.merge(graphdef, s)(**x)
    return jnp.mean(jnp.square(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return np.asarray(out), {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def _max_rel(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(b[k])) + 1e-30)) for k in a)


@pytest.mark.parametrize("name", [pytest.param("flux1-kontext", marks=pytest.mark.slow), "flux2-dev-3ref"])
def test_scan_equals_unrolled_and_remat_changes_nothing(name):
  out, grads = _forward_and_grads(name)
  assert all(np.any(g != 0) for g in grads.values())   # every parameter receives a gradient
  for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
                  dict(remat="dots_no_batch", scan_layers=False)):
    out_v, grads_v = _forward_and_grads(name, **variant)
    assert np.max(np.abs(out_v - out)) <= 1e-6 * np.max(np.abs(out)), variant
    assert _max_rel(grads_v, grads) <= 1e-5, variant


def test_unknown_remat_policy():
  with pytest.raises(ValueError, match="remat='some'"):
    jax_model("flux1-kontext", remat="some")


def test_flops_count_every_layer_of_a_scanned_model():
  """XLA counts a scan's body once; `JittedMMDiT.flops` counts the unrolled program, so the count grows by the
  same amount with every added pair of blocks, and equals an unscanned model's."""
  from sparse_context_jax.model.jitted import JittedMMDiT, flops
  from sparse_context_jax.model.mmdit import MMDiT
  from conftest import torch_model
  import reference as ref
  base = ref.config_of(torch_model("flux2-dev-3ref"))
  x = as_jax(inputs("flux2-dev-3ref"))

  def count(double: int, single: int, scan: bool = True):
    cfg = base.replace(depth_double=double, depth_single=single)
    return JittedMMDiT(nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), scan_layers=scan))).flops(**x)

  f1, f2, f3 = count(1, 2), count(2, 4), count(3, 6)
  assert f2 > 1.5 * f1 and abs((f3 - f2) - (f2 - f1)) <= 1e-6 * f3
  cfg = base.replace(depth_double=2, depth_single=4)
  unscanned = JittedMMDiT(MMDiT(cfg, rngs=nnx.Rngs(0), scan_layers=False))
  assert f2 == count(2, 4, scan=False) and abs(f2 - flops(unscanned.compiled(**x))) <= 0.02 * f2
