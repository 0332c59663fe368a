"""LoRA training (sparse_context_jax/lora): an attached model equals its base at step 0 bit for bit, merged equals
unmerged, only the LoRA factors are trained and held by the optimizer, and a few steps lower the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_context_jax import lora as lora_lib
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.train import config as C
from sparse_context_jax.train.state import split_state

from test_train_step import Run, leaves, make_batch, max_rel, tiny

LORA = ["lora.rank=4", "lora.alpha=8.0"]


def _inputs(cfg: MMDiTConfig, seed=0):
  rng = np.random.default_rng(seed)
  B, L, T = 2, 12, 5
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  kw = dict(img=f(B, L, cfg.in_channels), txt=f(B, T, cfg.context_dim), timesteps=jnp.asarray([0.3, 0.8]),
            img_ids=jnp.asarray(rng.integers(0, 4, (L, cfg.n_axes)), jnp.float32),
            txt_ids=jnp.zeros((T, cfg.n_axes), jnp.float32))
  if cfg.guidance_embed:
    kw["guidance"] = jnp.asarray([3.5, 3.5])
  if cfg.pooled_dim:
    kw["y"] = f(B, cfg.pooled_dim)
  return kw


def _lora_cfg(rank=4, alpha=8.0, targets=lora_lib.DEFAULT_TARGETS + lora_lib.MLP_TARGETS):
  import ml_collections
  return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, targets=targets))


def test_default_targets_cover_attention_and_fused_projections():
  config = tiny(*LORA)
  cfg = C.model_config(config)
  names = lora_lib.module_names(nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0))), config.lora.targets)
  assert set(names) == {"double_blocks.img_attn.qkv", "double_blocks.txt_attn.qkv", "double_blocks.img_proj",
                        "double_blocks.txt_proj", "single_blocks.attn.qkv", "single_blocks.mlp.fc1",
                        "single_blocks.proj", "single_blocks.mlp.fc2"}


def test_merged_equals_unmerged_forward_and_zero_b_equals_base():
  cfg = C.model_config(tiny())
  for scan in (True, False):
    model = MMDiT(cfg, rngs=nnx.Rngs(0), scan_layers=scan)
    kw = _inputs(cfg)
    base_out = model(**kw)
    lcfg = _lora_cfg()
    lora_lib.attach(model, lcfg, nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(**kw)), np.asarray(base_out))   # B = 0: the base, bitwise
    graphdef, params, lora = split_state(model)
    # random B so that the adapters matter
    keys = iter(jax.random.split(jax.random.key(2), 100))
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.3 if p[-1].key == "lora_b" else x, lora)
    unmerged = nnx.merge(graphdef, params, nnx.State(lora))(**kw)
    merged_params = lora_lib.merge_lora(params.to_pure_dict(), lora, lcfg)
    plain_graph, plain_params = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(5), scan_layers=scan), nnx.Param)
    plain_params.replace_by_pure_dict(merged_params)
    merged = nnx.merge(plain_graph, plain_params)(**kw)
    assert float(jnp.max(jnp.abs(unmerged - base_out))) > 1e-2   # the adapters change the output
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=1e-5)


def test_lora_step0_equals_base_and_only_lora_is_trained():
  batch = make_batch(C.model_config(tiny()))
  same = ["model.remat=full", "train.ema_decay=0.9", "train.grad_accum=2"]
  full = Run(tiny(*same), batch)
  run = Run(tiny(*LORA, *same), batch)
  base_before = {k: v.copy() for k, v in leaves(run.state["params"]).items()}
  # the base is the full run's initial parameters, with the same tree
  assert jax.tree.structure(run.state["params"]) == jax.tree.structure(full.state["params"])
  for k, v in leaves(full.state["params"]).items():
    np.testing.assert_array_equal(v, base_before[k])
  # the optimizer state holds moments of the LoRA factors only
  opt_leaves = [x for x in jax.tree.leaves(run.state["opt"]) if x.ndim > 0]
  lora_sizes = sorted(x.size for x in jax.tree.leaves(run.state["lora"]))
  assert sorted(x.size for x in opt_leaves) == sorted(lora_sizes * 2)
  assert sum(x.size for x in opt_leaves) < sum(x.size for x in jax.tree.leaves(run.state["params"]))
  assert jax.tree.structure(run.state["ema"]) == jax.tree.structure(run.state["lora"])
  assert jax.tree.structure(full.state["ema"]) == jax.tree.structure(full.state["params"])
  m_full, m_lora = full.step(), run.step()
  # Step 0: B = 0, the base model. Not bit for bit: the LoRA step is another XLA program (the adapters' matmuls
  # join the fusions), whose float32 sums XLA may order differently by CPU (on an AVX-512 EPYC: 1e-7 apart); B
  # initialised to 1e-4 instead of 0 moves the loss by 4e-6.
  assert m_lora["loss"] == pytest.approx(m_full["loss"], rel=1e-6)
  for k, v in leaves(run.state["params"]).items():
    np.testing.assert_array_equal(v, base_before[k])   # frozen
  b = [x for p, x in jax.tree_util.tree_leaves_with_path(run.state["lora"]) if p[-1].key == "lora_b"]
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in b)   # B moved off zero


def test_thirty_lora_steps_lower_the_loss():
  config = tiny(*LORA, "train.lr=3e-3")
  run = Run(config, make_batch(C.model_config(config)))
  losses = [run.step()["loss"] for _ in range(30)]
  assert np.mean(losses[-5:]) < 0.93 * np.mean(losses[:5]), losses


# --- lora.dropout: peft's dropout on the adapters' input, in the train step only ---

def _random_b(model, seed=2):
  """A model's adapters with random B (so that they and their dropout matter), in place."""
  keys = iter(jax.random.split(jax.random.key(seed), 100))
  graphdef, params, lora = split_state(model)
  lora = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.3 if p[-1].key == "lora_b" else x, lora)
  return graphdef, params, nnx.State(lora)


def test_dropout_mask_rate_scale_and_per_example_keys():
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), 4))
  x = jnp.ones((4, 50, 40), jnp.float32)
  y = np.asarray(lora_lib.dropout(x, 0.3, keys))
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.7)}
  assert abs(float(np.mean(y == 0)) - 0.3) < 0.02
  assert not np.array_equal(y[0], y[1])   # each example its own mask
  np.testing.assert_array_equal(np.asarray(lora_lib.dropout(x[2:3], 0.3, keys[2:3]))[0], y[2])   # from its key alone
  np.testing.assert_array_equal(np.asarray(lora_lib.dropout(x, 0.0, keys)), np.asarray(x))


def test_dropout_inside_the_block_scan_and_only_where_the_train_step_sets_it():
  cfg = C.model_config(tiny())
  kw = _inputs(cfg)
  example_keys = jax.random.key_data(jax.random.split(jax.random.key(7), 2))
  outs = {}
  for scan in (True, False):
    model = MMDiT(cfg, rngs=nnx.Rngs(0), scan_layers=scan)
    lora_lib.attach(model, _lora_cfg(), nnx.Rngs(1))
    graphdef, params, lora = _random_b(model)
    plain = nnx.merge(graphdef, params, lora)(**kw)
    dropped = nnx.merge(graphdef, params, lora)
    lora_lib.with_dropout(dropped, 0.5, example_keys)
    outs[scan] = np.asarray(dropped(**kw))
    assert float(np.max(np.abs(outs[scan] - np.asarray(plain)))) > 1e-2   # the dropout changes the output
    again = nnx.merge(graphdef, params, lora)
    lora_lib.with_dropout(again, 0.5, example_keys)
    np.testing.assert_array_equal(np.asarray(again(**kw)), outs[scan])   # deterministic given the keys
    # a model merged from the same state without keys (evaluation, sampling) does not drop
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, params, lora)(**kw)), np.asarray(plain))
    # example 0's masks come from its key alone: the same output in a batch of one (any micro-batching)
    one = nnx.merge(graphdef, params, lora)
    lora_lib.with_dropout(one, 0.5, example_keys[:1])
    out1 = one(**{k: (v[:1] if k in ("img", "txt", "timesteps", "guidance", "y") else v) for k, v in kw.items()})
    np.testing.assert_allclose(np.asarray(out1)[0], outs[scan][0], atol=1e-6, rtol=1e-6)
  # each layer of a stack gets its own keys, sliced by the scan as the unrolled loop indexes them
  np.testing.assert_allclose(outs[True], outs[False], atol=1e-5, rtol=1e-5)


def _mu(state) -> dict:
  """Adam's first moments, (1 - b1) g after one step: the step's gradient up to a constant."""
  return {k: v for k, v in leaves(state["opt"]).items() if ".mu[" in k}


@pytest.mark.slow   # minutes here; test_dropout_inside_the_block_scan_... runs by default
def test_dropout_changes_only_the_lora_gradients_and_is_deterministic():
  batch = make_batch(C.model_config(tiny()))
  plain = Run(tiny(*LORA), batch)
  zero = Run(tiny(*LORA, "lora.dropout=0.0"), batch)
  drop = Run(tiny(*LORA, "lora.dropout=0.5"), batch)
  drop2 = Run(tiny(*LORA, "lora.dropout=0.5"), batch)
  m_plain, m_zero, m_drop, m_drop2 = plain.step(), zero.step(), drop.step(), drop2.step()
  # step 0: B = 0, so the loss is the base model's: the same t, noise and dropped tokens with dropout on
  assert m_plain == m_zero and m_drop["loss"] == m_plain["loss"]
  g_plain, g_drop = _mu(plain.state), _mu(drop.state)
  for k, v in _mu(zero.state).items():
    np.testing.assert_array_equal(v, g_plain[k])
  assert max_rel(g_drop, g_plain) > 1e-2   # dB = scale (dropout(x) A)^T dy moves with the mask
  for _ in range(2):
    m_drop, m_drop2 = drop.step(), drop2.step()
    assert m_drop == m_drop2
  for k, v in leaves(drop.state).items():
    np.testing.assert_array_equal(v, leaves(drop2.state)[k])   # bitwise, given the seed
  # the state holds no dropout keys: the same tree as without dropout
  assert jax.tree.structure(drop.state) == jax.tree.structure(plain.state)


@pytest.mark.slow   # minutes here; test_dropout_inside_the_block_scan_... runs by default
def test_dropout_with_grad_accum_and_ema():
  """LoRA + dropout + EMA over the adapters + micro-batches, on a rung that drops random reference tokens: each
  example draws the same masks in any micro-batch, so grad_accum 1 and 2 give the same loss and gradients up to
  float rounding; the EMA of the adapters follows its closed form."""
  d = 0.9
  batch = make_batch(C.model_config(tiny()))
  runs = {n: Run(tiny(*LORA, "lora.dropout=0.3", f"train.ema_decay={d}", f"train.grad_accum={n}"), batch)
          for n in (1, 2)}
  lora_steps = {n: [leaves(r.state["lora"])] for n, r in runs.items()}
  metrics, grads = {}, {}
  for n, r in runs.items():
    metrics[n] = r.step()
    grads[n] = _mu(r.state)
    lora_steps[n].append(leaves(r.state["lora"]))
  assert metrics[2]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-6)
  assert max_rel(grads[2], grads[1]) <= 5e-6   # a mask that moved with the micro-batch would change them by ~1
  r = runs[2]
  r.step()
  lora_steps[2].append(leaves(r.state["lora"]))
  p0, p1, p2 = lora_steps[2]
  assert max_rel(p2, p0) > 1e-3   # it trained
  expected = {k: d**2 * p0[k] + d * (1 - d) * p1[k] + (1 - d) * p2[k] for k in p0}
  assert max_rel(leaves(r.state["ema"]), expected) <= 1e-6


def test_dropout_outside_zero_one_is_refused():
  for bad in ("1.0", "-0.1", "1.5"):
    with pytest.raises(C.ConfigError, match=r"lora\.dropout=.*expected 0 <= dropout < 1"):
      C.validate(tiny(*LORA, f"lora.dropout={bad}"), 1)
  C.validate(tiny(*LORA, "lora.dropout=0.5"), 1)
