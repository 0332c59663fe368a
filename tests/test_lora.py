"""LoRA training (sparse_context_jax/lora): an attached model equals its base at step 0 bit for bit, merged equals
unmerged, only the LoRA factors are trained and held by the optimizer, and a few steps lower the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparse_context_jax import lora as lora_lib
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.train import config as C
from sparse_context_jax.train.state import split_state

from test_train_step import Run, leaves, make_batch, tiny

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
  assert m_full["loss"] == m_lora["loss"]   # step 0: B = 0, the base model exactly
  for k, v in leaves(run.state["params"]).items():
    np.testing.assert_array_equal(v, base_before[k])   # frozen
  b = [x for p, x in jax.tree_util.tree_leaves_with_path(run.state["lora"]) if p[-1].key == "lora_b"]
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in b)   # B moved off zero


def test_thirty_lora_steps_lower_the_loss():
  config = tiny(*LORA, "train.lr=3e-3")
  run = Run(config, make_batch(C.model_config(config)))
  losses = [run.step()["loss"] for _ in range(30)]
  assert np.mean(losses[-5:]) < 0.93 * np.mean(losses[:5]), losses
