"""The training-free `attention` strategy: the blockwise mass equals the materialised softmax of the model's own q, k;
top-k into buckets; one scoring program whatever the budget; a generate job end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_context_jax import preset
from sparse_context_jax.encoders.base import PromptEmbeddings
from sparse_context_jax.encoders.pixels import PixelTokens
from sparse_context_jax.generate import Pipeline
from sparse_context_jax.model import MMDiT, blocks as B
from sparse_context_jax.model.attention_mass import attention_mass, default_blocks, key_mass, resolve_blocks
from sparse_context_jax.model.positions import image_ids, reference_index, text_ids
from sparse_context_jax.sparse import Reference, SparsePacker, SparseRequest, pack_references
from sparse_context_jax.sparse.select import fixed_budget

CFG = preset("flux2-klein-4b").replace(num_heads=3, head_dim=16, axes_dims=(4, 4, 4, 4), depth_double=4,
                                       depth_single=1, context_dim=24, in_channels=12, out_channels=12)
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


def _direct_mass(model, inputs, blocks, img_lengths=None, **kv):
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
    model(**inputs, img_lengths=img_lengths, **kv)
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


def test_a_kv_model_scores_with_its_first_steps_extract_mode():
  cfg = CFG.replace(reference_attention="kv")
  model, x = _model(cfg), _inputs(cfg)
  n = TARGET[0] * TARGET[1]
  got = np.asarray(attention_mass(model, **x, n_target=n, blocks=(1, 2), key_block=8))
  want = _direct_mass(model, x, (1, 2), kv_cache_mode="extract", num_ref_tokens=x["img"].shape[1] - n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  joint = np.asarray(attention_mass(_model(), **x, n_target=n, blocks=(1, 2), key_block=8))
  assert not np.allclose(got, joint)   # the references' keys differ (modulated at timestep 0)


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


# ---- the strategy in the pipeline ---------------------------------------------------------------------------------
def _pipeline():
  return Pipeline(MMDiT(CFG, rngs=nnx.Rngs(0)), PixelTokens(CFG.in_channels))


def _scored(pipe, seed=0, blocks=(0, 2), direct=True):
  """References with their attention mass (the pipeline's program), and the mass computed directly (or None)."""
  x = _inputs(batch=2, seed=seed)
  n = TARGET[0] * TARGET[1]
  sizes = [(16 * h, 16 * w) for h, w in REFS]
  ends = np.cumsum([n] + [h * w for h, w in REFS])
  latents = [x["img"][:, a:b] for a, b in zip(ends[:-1], ends[1:])]
  prompt = PromptEmbeddings(np.asarray(x["txt"]))
  mass = pipe.attention_scores(x["img"][:, :n], latents, prompt, 1.0, target_grid=TARGET, grids=REFS, blocks=blocks)
  refs = [Reference(l, s, attention=m) for l, s, m in zip(latents, sizes, mass)]
  if not direct:
    return refs, None
  direct = attention_mass(_model(), **dict(x, timesteps=jnp.ones(2)), n_target=n, blocks=blocks)
  return refs, [direct[:, a:b] for a, b in zip(ends[:-1], ends[1:])]


def test_pipeline_scores_select_the_top_mass_tokens_into_buckets_with_one_scoring_program():
  pipe = _pipeline()
  compiles = []

  def listen(event, *_, **__):
    # Every XLA compile, whoever asks for it, and every program read back from a compilation cache instead.
    if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits"):
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  jax.monitoring.register_event_listener(listen)
  try:
    _select_across_budgets(pipe, compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
    jax.monitoring.unregister_event_listener(listen)


def _select_across_budgets(pipe, compiles):
  refs, direct = _scored(pipe)
  for r, d in zip(refs, direct):   # the pipeline's program: the model's mass, split per reference
    np.testing.assert_allclose(np.asarray(r.attention), np.asarray(d), rtol=1e-5, atol=1e-6)
  pipe.select(refs, SparseRequest("attention", keep=0.5))
  pipe.select(refs, SparseRequest("attention", tau=0.5))
  for seed, request in enumerate([SparseRequest("attention", keep=0.25), SparseRequest("attention", keep=0.1),
                                  SparseRequest("attention", keep=(0.3, 1.0)), SparseRequest("attention", tau=0.8),
                                  SparseRequest("attention", budgets=(2, 5))]):
    warm = len(compiles)
    refs, _ = _scored(pipe, seed=seed + 1, direct=False)     # new inputs, same shapes: scoring and planning
    plan, scores = pipe.select(refs, request)                # compile nothing (the rung is the packed step's)
    assert len(compiles) == warm, f"{request} compiled {len(compiles) - warm} programs"
    for i, (r, s) in enumerate(zip(refs, scores)):   # the strategy's scores are the mass; the rung holds the budget
      assert np.array_equal(np.asarray(s), np.asarray(r.attention, np.float32))
      assert plan.rung.capacities[i] == fixed_budget(plan.rung.ratio, r.tokens) >= plan.budgets[:, i].max()
    tokens, _, lengths = pack_references(CFG, [r.latents for r in refs], scores, jnp.asarray(plan.budgets), plan.rung)
    for b in range(2):   # the kept tokens are the top-mass ones, each reference's in raster order
      kept = []
      for r, k in zip(refs, plan.budgets[b]):
        top = np.argsort(-np.asarray(r.attention[b]), kind="stable")[:k]
        kept.append(np.asarray(r.latents[b])[np.sort(top)])
      kept = np.concatenate(kept)
      assert int(lengths[b]) == len(kept)
      np.testing.assert_array_equal(np.asarray(tokens[b, :len(kept)]), kept)
  assert pipe.scorer.programs.count == 1
  other = pipe.attention_scores(jnp.zeros((2, 12, 12)), [r.latents for r in refs],
                                PromptEmbeddings(np.zeros((2, T, 24), np.float32)), 0.5, target_grid=TARGET,
                                grids=REFS, blocks=(1,))
  assert pipe.scorer.programs.count == 2 and other[0].shape == (2, 6)   # other blocks: another program


def test_tau_budget_is_the_smallest_top_mass_prefix_reaching_tau():
  pipe = _pipeline()
  refs, _ = _scored(pipe)
  for tau in (0.2, 0.5, 0.9):
    plan, _ = pipe.select(refs, SparseRequest("attention", tau=tau, min_keep=1 / 16))
    for i, r in enumerate(refs):
      for b in range(2):
        share = np.sort(np.asarray(r.attention[b], np.float64))[::-1] / np.sum(np.asarray(r.attention[b]))
        want = int(np.argmax(np.cumsum(share) >= tau - 1e-6)) + 1
        assert plan.budgets[b, i] == max(want, 1)


def test_requests_and_references_are_checked():
  with pytest.raises(ValueError, match="attention_blocks go with the attention strategy"):
    SparseRequest("edge", keep=0.5, attention_blocks=(0,))
  with pytest.raises(ValueError, match="attention_blocks"):
    SparseRequest("attention", keep=0.5, attention_blocks=())
  assert SparseRequest("hybrid", keep=0.5, hybrid_base="attention", attention_blocks=[1]).attention_blocks == (1,)
  packer = SparsePacker(CFG)
  latents = jnp.zeros((1, 6, CFG.in_channels))
  with pytest.raises(ValueError, match="needs the attention mass of reference 0"):
    packer.plan([Reference(latents, (32, 48))], SparseRequest("attention", keep=0.5))
  with pytest.raises(ValueError, match=r"attention mass has shape \(1, 5\), expected \(1, 6\)"):
    packer.plan([Reference(latents, (32, 48), attention=jnp.ones((1, 5)))], SparseRequest("attention", keep=0.5))


# ---- generate -----------------------------------------------------------------------------------------------------
def test_generate_jobs_with_the_attention_strategy_run_end_to_end(tmp_path):
  import json

  from test_generate import _generate, _world
  jobs = _world(tmp_path, 3, strategy="attention", keep=0.25)
  lines = [json.loads(l) for l in jobs.read_text().splitlines()]
  del lines[2]["keep"]
  lines[2].update(tau=0.5, attention_blocks=[0])           # adaptive budget, blocks given
  lines.append({**lines[0], "attention_blocks": [3], "output": "out/bad.png"})        # the model has 1 double block
  lines.append({**lines[0], "strategy": "grid", "attention_blocks": [0], "output": "out/bad2.png"})
  jobs.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  r = _generate(jobs)
  assert r.returncode == 1   # the two bad lines
  errors = [e for e in r.stderr.splitlines() if "attention_blocks" in e]
  assert "attention_blocks=[3] must be indices of double blocks, in [0, 0]" in errors[0] and ":4:" in errors[0]
  assert "attention_blocks go with the attention strategy, not 'grid'" in errors[1] and ":5:" in errors[1]
  report = json.loads((tmp_path / "jobs.report.json").read_text())
  assert [j["strategy"] for j in report["jobs"]] == ["attention"] * 3
  for j in report["jobs"][:2]:   # 64x64 references: 16 tokens each, keep 1/4
    assert j["kept_tokens"] == [4, 4] and j["bucket"] == 0.25
    assert np.all(np.isfinite(np.load(j["output"][:-4] + ".npy")))
  assert report["jobs"][2]["tau"] == 0.5 and 1 <= min(report["jobs"][2]["kept_tokens"])
  # one scoring program for the three jobs (same shapes; blocks [0] are the default of a 1-block model)
  assert sum(p["program"] == "attention" for p in report["programs"]) == 1
