"""The train step on a hand-made batch: gradient accumulation is exact, the EMA follows its closed form, bfloat16
compute keeps float32 master weights and optimizer moments."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_context_jax.parallel import make_mesh
from sparse_context_jax.train import config as C
from sparse_context_jax.train.objective import ladder
from sparse_context_jax.train.state import init_state, setup
from sparse_context_jax.train.step import compile_step

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
RATIO, GRID = 0.25, (4, 4)   # one keep-ratio rung; 64x64 images are 4x4 tokens
# A constant learning rate from step 0 (warmup would make the first update zero), batch 8.
BASE = ["objective.keep_low=0.25", "objective.keep_high=0.25", "objective.dense_prob=0.0", "train.batch_size=8",
        "train.schedule=constant", "train.warmup_steps=0"]


def tiny(*overrides):
  return C.apply_overrides(C.load(TINY), BASE + list(overrides))


def make_batch(cfg, batch: int = 8, refs: int = 2, txt_len: int = 8, seed: int = 0) -> dict:
  """A model batch as `batches.pixel_batch` builds it: some absent references and one padding example."""
  rng = np.random.default_rng(seed)
  n = GRID[0] * GRID[1]
  ref_valid = np.ones((batch, refs), bool)
  ref_valid[1::3, 1] = False
  weight = np.ones((batch,), np.float32)
  weight[-1] = 0.0
  return {"target": rng.uniform(-1, 1, (batch, n, cfg.in_channels)).astype(np.float32),
          "refs": rng.uniform(-1, 1, (batch, refs, n, cfg.in_channels)).astype(np.float32),
          "ref_valid": ref_valid,
          "txt": rng.normal(size=(batch, txt_len, cfg.context_dim)).astype(np.float32),
          "weight": weight}


class Run:
  """A fresh state of `config` and its compiled step for `batch` (the state is donated: copy what you keep)."""

  def __init__(self, config, batch: dict):
    C.validate(config, 1)
    cfg = C.model_config(config)
    self.s = setup(config, cfg, make_mesh(config.mesh, jax.devices()[:1]))
    self.state = init_state(config, cfg, self.s)
    self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rung = ladder(config.objective).at(RATIO, (GRID,) * batch["refs"].shape[1])
    self.step_fn = compile_step(self.s, config, rung, self.batch)

  def step(self) -> dict:
    self.state, metrics = self.step_fn(self.state, self.batch)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def max_rel(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-12)) for k in a)


@pytest.mark.slow
def test_grad_accumulation_is_exact():
  """grad_accum 1, 2, 4 on the same batch draw the same t, noise and dropped tokens per example: the same loss and
  gradients up to float rounding (the gradient read back from Adam's first moment, (1 - b1) g after one step)."""
  batch = make_batch(C.model_config(tiny()))
  p0, results = None, {}
  for n in (1, 2, 4):
    run = Run(tiny(f"train.grad_accum={n}"), batch)
    p0 = leaves(run.state["params"]) if p0 is None else p0
    metrics = run.step()
    opt = leaves(run.state["opt"])
    results[n] = (metrics, {k: v for k, v in opt.items() if ".mu[" in k}, leaves(run.state["params"]))
  m1, g1, p1 = results[1]
  assert len(g1) == len(p1) and max_rel(p1, p0) > 1e-4   # the step moved the parameters
  assert m1["examples"] == 7.0 and np.isfinite(m1["loss"]) and m1["loss"] > 0
  for n in (2, 4):
    m, g, p = results[n]
    assert m["loss"] == pytest.approx(m1["loss"], rel=1e-6), n
    assert max_rel(g, g1) <= 5e-6, n
    # Adam's first update is g / (|g| + 1e-8) lr: entries with |g| near 1e-8 turn the gradients' rounding
    # (~1e-6 relative to each tensor's largest entry) into ~1e-5 of the parameters. A different draw moves
    # them by ~lr = 1e-3.
    assert max_rel(p, p1) <= 1e-4, n


def test_ema_follows_its_closed_form():
  d = 0.9
  run = Run(tiny(f"train.ema_decay={d}"), make_batch(C.model_config(tiny())))
  params = [leaves(run.state["params"])]
  for _ in range(3):
    run.step()
    params.append(leaves(run.state["params"]))
  ema = leaves(run.state["ema"])
  p0, p1, p2, p3 = params
  expected = {k: d**3 * p0[k] + d**2 * (1 - d) * p1[k] + d * (1 - d) * p2[k] + (1 - d) * p3[k] for k in p0}
  assert max_rel(ema, expected) <= 1e-6
  assert max_rel(ema, p3) > 1e-3 and max_rel(ema, p0) > 1e-4   # neither the last params nor the first


def _dtypes(tree) -> set:
  return {np.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_weights_and_moments():
  batch = make_batch(C.model_config(tiny()))
  loss32 = Run(tiny(), batch).step()["loss"]

  run = Run(tiny("model.dtype=bfloat16", "model.param_dtype=float32"), batch)
  loss16 = run.step()["loss"]
  assert np.isfinite(loss16)
  assert 0 < abs(loss16 - loss32) / loss32 < 3e-2   # bfloat16 was used (not bitwise the float32 loss), and is close
  assert _dtypes(run.state["params"]) == {np.dtype(np.float32)}
  assert _dtypes(run.state["opt"]) == {np.dtype(np.float32)}   # Adam's moments follow the master weights

  run = Run(tiny("model.dtype=bfloat16", "model.param_dtype=bfloat16"), batch)
  assert _dtypes(run.state["params"]) == {np.dtype(jnp.bfloat16)}
  assert np.isfinite(run.step()["loss"])
  assert _dtypes(run.state["params"]) == {np.dtype(jnp.bfloat16)}
