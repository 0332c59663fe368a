"""The training-free `attention` strategy: the blockwise mass equals the materialised softmax of the model's own q, k;
top-k into buckets; one scoring program whatever the budget; a generate job end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_context_jax import preset
from sparse_context_jax.model import MMDiT, blocks as B
from sparse_context_jax.model.attention_mass import attention_mass, default_blocks, key_mass, resolve_blocks
from sparse_context_jax.model.positions import image_ids, reference_index, text_ids

CFG = preset("flux2-klein-4b").replace(num_heads=3, head_dim=16, axes_dims=(4, 4, 4, 4), depth_double=4,
                                       depth_single=1, context_dim=24, in_channels=8, out_channels=8)
T, TARGET, REFS = 5, (3, 4), ((2, 3), (3, 3))


def _model(cfg=CFG, seed=0):
  return MMDiT(cfg, rngs=nnx.Rngs(seed), scan_layers=False)


def _inputs(cfg=CFG, batch=2, seed=0, pad=0):
  """Dense [target | ref_1 | ref_2] (plus `pad` padding slots) with its ids and text."""
  rng = np.random.default_rng(seed)
  grids = (TARGET,) + REFS
  ids = [image_ids(cfg, *TARGET)] + [image_ids(cfg, *g, reference_index(cfg, i)) for i, g in enumerate(REFS)]
  L = sum(h * w for h, w in grids)
  ids = np.concatenate(ids + [np.zeros((pad, cfg.n_axes), np.float32)])
  return dict(img=jnp.asarray(rng.standard_normal((batch, L + pad, cfg.in_channels)), jnp.float32),
              txt=jnp.asarray(rng.standard_normal((batch, T, cfg.context_dim)), jnp.float32),
              timesteps=jnp.asarray([1.0, 0.7][:batch], jnp.float32), img_ids=jnp.asarray(ids),
              txt_ids=jnp.asarray(text_ids(cfg, T)))


def _direct_mass(model, inputs, blocks, img_lengths=None):
  """The model's own forward with every double block's q, k recorded (`blocks.joint_attention` wrapped), and the
  materialised softmax of q k^T / sqrt(Dh) (keys past T + img_lengths masked), summed over the text and target
  queries, averaged over heads and the chosen blocks -> (B, L) over the image keys."""
  recorded = []
  original = B.joint_attention

  def spy(q, k, v, kv_len, impl, kv):
    recorded.append((np.asarray(q, np.float64), np.asarray(k, np.float64), kv_len))
    return original(q, k, v, kv_len, impl, kv)

  B.joint_attention = spy
  try:
    model(**inputs, img_lengths=img_lengths)
  finally:
    B.joint_attention = original
  n_q = T + TARGET[0] * TARGET[1]
  total = 0
  for i in blocks:
    q, k, kv_len = recorded[i]   # double blocks run first, in order
    logits = np.einsum("bqhd,bkhd->bhqk", q[:, :n_q], k) / np.sqrt(q.shape[-1])
    if kv_len is not None:
      logits = np.where(np.arange(k.shape[1])[None, None, None] < np.asarray(kv_len)[:, None, None, None], logits,
                        -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    total = total + p.sum(axis=2).mean(axis=1)
  return (total / len(blocks))[:, T:]


@pytest.mark.parametrize("blocks, key_block", [((0, 2, 3), 7), ((1,), 512), ((0, 1, 2, 3), 16)])
def test_mass_equals_the_materialised_softmax_of_the_models_q_and_k(blocks, key_block):
  model, x = _model(), _inputs()
  n = TARGET[0] * TARGET[1]
  got = np.asarray(jax.jit(lambda x: attention_mass(model, **x, n_target=n, blocks=blocks, key_block=key_block))(x))
  want = _direct_mass(model, x, blocks)
  assert got.shape == (2, x["img"].shape[1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # every text and target query's probabilities sum to one over all keys: the image keys hold less than that
  assert np.all(got.sum(-1) < T + n) and np.all(got > 0)


def test_padding_keys_get_no_mass_and_are_excluded_from_the_softmax():
  model = _model()
  x = _inputs(pad=6)
  L = x["img"].shape[1] - 6
  lengths = jnp.asarray([L, L - 4], jnp.int32)   # example 1: its last reference tokens are padding too
  n = TARGET[0] * TARGET[1]
  got = np.asarray(attention_mass(model, **x, n_target=n, blocks=(0, 3), key_block=5, img_lengths=lengths))
  want = _direct_mass(model, x, (0, 3), img_lengths=lengths)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[0, L:] == 0) and np.all(got[1, L - 4:] == 0)
  # padding contents never matter
  x2 = dict(x, img=x["img"].at[:, L:].set(1e4))
  got2 = np.asarray(attention_mass(model, **x2, n_target=n, blocks=(0, 3), key_block=5, img_lengths=lengths))
  np.testing.assert_allclose(got2, got, rtol=1e-6, atol=1e-7)


def test_key_mass_blocks_and_masks_like_a_direct_softmax():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 9, 2, 8)).astype(np.float32) * 3
  k = rng.standard_normal((2, 23, 2, 8)).astype(np.float32) * 3
  kv_len = np.asarray([23, 11])
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
  logits = np.where(np.arange(23)[None, None, None] < kv_len[:, None, None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = (p / p.sum(-1, keepdims=True)).sum(2).mean(1)
  for block in (1, 4, 23, 64):   # one key per block, ragged last block, one block, a block longer than the keys
    np.testing.assert_allclose(np.asarray(key_mass(jnp.asarray(q), jnp.asarray(k), jnp.asarray(kv_len), block)),
                               want, rtol=1e-5, atol=1e-6)


def test_blocks_default_and_validation():
  assert default_blocks(CFG) == (0, 2, 3) and default_blocks(CFG.replace(depth_double=8)) == (0, 4, 7)
  assert default_blocks(CFG.replace(depth_double=1)) == (0,)
  assert resolve_blocks(CFG, [3, 1, 1]) == (1, 3)
  for bad in ([], [4], [-1], [True], [1.5]):
    with pytest.raises(ValueError, match="attention_blocks"):
      resolve_blocks(CFG, bad)
