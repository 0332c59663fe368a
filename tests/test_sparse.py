"""Sparse references: packing, buckets, compile counts, errors (strategies: test_sparse_strategies.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from conftest import jax_model, torch_model
from sparse_context_jax.model.jitted import JittedMMDiT
from sparse_context_jax.sparse import (BucketLadder, Reference, Rung, SparsePacker, SparseRequest,
                                       compare_dense_sparse, dense_inputs, pack_references, with_target)

FAMILIES = {"flux1": ("flux1-kontext", [(48, 80)]), "flux2": ("flux2-klein-2ref", [(32, 48), (48, 32), (64, 64)])}


def _setup(family: str, batch: int = 2, seed: int = 0):
  name, ref_sizes = FAMILIES[family]
  cfg = ref.config_of(torch_model(name))
  rng = np.random.default_rng(seed)
  target_size = (64, 64)
  target = rng.standard_normal((batch, 16, cfg.in_channels)).astype(np.float32)
  refs = [Reference(rng.standard_normal((batch, (h // 16) * (w // 16), cfg.in_channels)).astype(np.float32), (h, w),
                    pixels=rng.random((batch, h, w, 3)).astype(np.float32),
                    mask=rng.random((batch, h, w)) > 0.7) for h, w in ref_sizes]
  txt = ref.make_inputs(cfg, batch=batch, txt_len=5, seed=seed)
  common = {k: txt[k] for k in ("txt", "timesteps", "txt_ids", "y", "guidance") if k in txt}
  return name, cfg, target_size, target, refs, common


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keep_one_reproduces_dense_inputs_and_outputs_exactly(family):
  name, cfg, size, target, refs, common = _setup(family)
  packer, model = SparsePacker(cfg), JittedMMDiT(jax_model(name))
  img, ids = dense_inputs(cfg, target, size, refs)
  for strategy in ("random", "edge", "hybrid"):
    x = packer(target, size, refs, SparseRequest(strategy, keep=1.0))
    assert np.array_equal(x.img, np.broadcast_to(img, x.img.shape))
    assert np.array_equal(x.img_ids, np.broadcast_to(ids, x.img_ids.shape))
    assert np.all(np.asarray(x.img_lengths) == img.shape[1]) and x.bucket == 1.0
  dense_out = np.asarray(model(img=img, img_ids=ids, **common))
  sparse_out = np.asarray(model(img=x.img, img_ids=x.img_ids, img_lengths=x.img_lengths, **common))
  assert np.array_equal(dense_out, sparse_out)


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kept_tokens_carry_their_dense_ids_and_budgets(family, keep):
  _, cfg, size, target, refs, _ = _setup(family, batch=3)
  img, ids = (np.asarray(a) for a in dense_inputs(cfg, target, size, refs))
  x = SparsePacker(cfg)(target, size, refs, SparseRequest("random", keep=keep, seed=7))
  expected = [int(np.ceil(keep * r.tokens - 1e-9)) for r in refs]
  assert x.kept.tolist() == [expected] * 3
  assert all(c >= k for c, k in zip(x.capacities, expected))
  n = target.shape[1]
  for b in range(3):
    length = int(x.img_lengths[b])
    assert length == n + sum(expected)
    got_ids, got_img = np.asarray(x.img_ids[b, :length]), np.asarray(x.img[b, :length])
    rows = {tuple(r): i for i, r in enumerate(ids)}          # every dense token has distinct ids
    idx = [rows[tuple(r)] for r in got_ids]
    assert np.array_equal(got_img, img[b, idx])              # each kept row is exactly the dense row with those ids
    assert idx[:n] == list(range(n))                        # the target first, whole
    firsts = got_ids[n:, 0]
    for i, k in enumerate(expected):                         # reference i: exactly its budget, in raster order
      first = 1 if cfg.family == "flux1" else 10 + 10 * i
      mine = [j for j, f in zip(idx[n:], firsts) if f == first]
      assert len(mine) == k and mine == sorted(mine)
    assert np.all(np.asarray(x.img[b, length:]) == 0) and np.all(np.asarray(x.img_ids[b, length:]) == 0)


@pytest.mark.parametrize("family, request_kw", [
    ("flux1", dict(strategy="edge", tau=0.4)),
    ("flux2", dict(strategy="edge", tau=0.4)),
    ("flux2", dict(strategy="saliency", tau=0.3, min_keep=0.1, max_keep=0.6)),
    ("flux2", dict(strategy="hybrid", keep=(0.2, 0.5, 0.05))),
])
def test_padded_bucket_outputs_equal_the_unpadded_sparse_sequence(family, request_kw):
  name, cfg, size, target, refs, common = _setup(family, batch=2)
  model = JittedMMDiT(jax_model(name))
  # Example 0's references are noise everywhere, example 1's flat but for one corner: their adaptive budgets
  # differ, so they share one bucket with different valid lengths.
  for r in refs:
    r.pixels[1] = 0.5
    r.pixels[1, :16, :16] = np.random.default_rng(1).random((16, 16, 3))
  x = SparsePacker(cfg)(target, size, refs, SparseRequest(**request_kw))
  assert x.padding_waste > 0
  assert np.asarray(x.img_lengths).tolist() == [target.shape[1] + sum(k) for k in x.kept]
  if request_kw["strategy"] == "edge":   # more edges, more tokens
    assert x.img_lengths[0] > x.img_lengths[1]
  out = np.asarray(model(img=x.img, img_ids=x.img_ids, img_lengths=x.img_lengths, **common))
  poisoned_img = np.array(x.img)
  poisoned_ids = np.array(x.img_ids)
  for b in range(2):
    length = int(x.img_lengths[b])
    single = {k: v[b:b + 1] for k, v in common.items() if k != "txt_ids"}
    alone = np.asarray(model(img=x.img[b:b + 1, :length], img_ids=x.img_ids[b, :length],
                             txt_ids=common["txt_ids"], **single))
    assert ref.rel_err(out[b, :length], alone[0]) <= 1e-5
    poisoned_img[b, length:], poisoned_ids[b, length:] = 1e30, -7
  poisoned = np.asarray(model(img=poisoned_img, img_ids=poisoned_ids, img_lengths=x.img_lengths, **common))
  for b in range(2):
    length = int(x.img_lengths[b])
    assert np.array_equal(poisoned[b, :length], out[b, :length])


def test_fifty_requests_compile_no_more_programs_than_the_ladder_allows():
  name, cfg, size, target, _, common = _setup("flux2", batch=1)
  rng = np.random.default_rng(3)
  ladder = BucketLadder()
  packer, model = SparsePacker(cfg, ladder), JittedMMDiT(jax_model(name))
  hit, lengths = set(), set()
  for _ in range(50):
    n_refs = int(rng.integers(1, 5))
    refs = [Reference(rng.standard_normal((1, 16, cfg.in_channels)).astype(np.float32), (64, 64))
            for _ in range(n_refs)]
    x = packer(target, size, refs, SparseRequest("random", keep=float(rng.uniform(0.01, 1.0)),
                                                 seed=int(rng.integers(1 << 30))))
    model(img=x.img, img_ids=x.img_ids, img_lengths=x.img_lengths, **common)
    hit.add((n_refs, x.bucket))
    lengths.add(x.img.shape[1])
  per_refs = {n: sum(1 for m, _ in hit if m == n) for n in range(1, 5)}
  assert all(v <= len(ladder) for v in per_refs.values())
  # New seeds and ratios never recompile: one packing program per (reference count, rung), one denoiser program
  # per sequence length (rungs of different reference counts can share one).
  assert packer.programs.count == len(hit) <= 4 * len(ladder)
  assert model.programs.count == len(lengths) <= len(hit)
  # adaptive budgets: new tau values reuse the budget program and the rungs' packing programs
  refs = [Reference(rng.standard_normal((1, 16, cfg.in_channels)).astype(np.float32), (64, 64),
                    pixels=rng.random((1, 64, 64, 3)).astype(np.float32)) for _ in range(2)]
  rungs = {packer(target, size, refs, SparseRequest("edge", tau=float(t))).bucket for t in rng.uniform(0.05, 1, 12)}
  assert packer.budget_programs.count == 1 and packer.programs.count == len(hit) + len(rungs)


def test_bucket_ladder():
  ladder = BucketLadder()
  assert ladder.bucket_for([4], [16]) == 0.25
  assert ladder.bucket_for([5], [16]) == 0.375
  assert ladder.bucket_for([1, 16], [16, 16]) == 1.0
  assert ladder.capacities(0.1, [100, 7]) == (10, 1)
  with pytest.raises(ValueError, match="ascending"):
    BucketLadder((0.5, 0.25, 1.0))
  with pytest.raises(ValueError, match="ending with 1"):
    BucketLadder((0.25, 0.5))


def test_compare_helper_runs_dense_and_sparse():
  name, cfg, size, target, refs, common = _setup("flux2")
  c = compare_dense_sparse(JittedMMDiT(jax_model(name)), SparsePacker(cfg), target_latents=target,
                           target_size=size, references=refs, request=SparseRequest("grid", keep=0.25),
                           repeats=1, **common)
  assert c.dense.shape == c.sparse.shape == target.shape
  assert 0 < c.rel_err < 10 and c.sparse_flops < c.dense_flops and c.ideal_speedup > 1


@pytest.mark.parametrize("change, message", [
    (dict(request=dict(keep=0.0)), r"keep ratio 0.0 is outside \(0, 1\]"),
    (dict(request=dict(keep=1.5)), r"keep ratio 1.5 is outside \(0, 1\]"),
    (dict(request=dict(keep=None, tau=0.0)), r"tau 0.0 is outside \(0, 1\]"),
    (dict(request=dict(keep=None, tau=1.2)), r"tau 1.2 is outside \(0, 1\]"),
    (dict(request=dict(keep=None, budgets=(6, 6, 17))), r"budget 17 for reference 2 is outside \[1, 16\]"),
    (dict(request=dict(keep=0.5, tau=0.5)), "exactly one of keep, tau or budgets"),
    (dict(request=dict(strategy="canny")), "strategy 'canny' unknown"),
    (dict(target_size=(64, 60)), r"target size \(64, 60\) must be two positive multiples of 16"),
    (dict(ref_size=(40, 48)), r"reference 0 size \(40, 48\) must be two positive multiples of 16"),
    (dict(extra_refs=2), "5 references given; this packer is configured for at most 4"),
    (dict(ref_batch=3), r"reference 1 latents have shape \(3, 6, 32\), expected \(2, 6, 32\)"),
    (dict(request=dict(strategy="edge"), no_pixels=True), "strategy 'edge' needs the pixels of reference 0"),
])
def test_bad_requests_are_named(change, message):
  _, cfg, size, target, refs, _ = _setup("flux2")
  request = dict(strategy="random", keep=0.5)
  request.update(change.get("request", {}))
  if "ref_size" in change:
    refs[0] = Reference(refs[0].latents, change["ref_size"])
  refs += [refs[0]] * change.get("extra_refs", 0)
  if "ref_batch" in change:
    refs[1] = Reference(np.zeros((change["ref_batch"], 6, cfg.in_channels), np.float32), refs[1].size)
  if change.get("no_pixels"):
    refs = [Reference(r.latents, r.size) for r in refs]
  with pytest.raises(ValueError, match=message):
    SparsePacker(cfg)(target, change.get("target_size", size), refs, SparseRequest(**request))


def test_flux1_takes_one_reference():
  _, cfg, size, target, refs, _ = _setup("flux1")
  with pytest.raises(ValueError, match="FLUX.1 Kontext takes one reference"):
    SparsePacker(cfg)(target, size, refs * 2, SparseRequest(keep=0.5))


def test_pack_references_takes_given_scores():
  """The pure gather keeps the best-scored tokens of each reference, whoever made the scores."""
  _, cfg, size, target, refs, _ = _setup("flux2", batch=2)
  budgets = np.array([[2, 3, 1], [4, 1, 2]], np.int32)
  latents = [jnp.asarray(r.latents) for r in refs]
  rung = BucketLadder().at(1.0, [r.grid for r in refs])
  rung = Rung(rung.ratio, rung.grids, (4, 4, 4))
  # Reference i prefers its last tokens for example 0 and its first ones for example 1.
  scores = [jnp.asarray(np.stack([np.arange(r.tokens), -np.arange(r.tokens)]), jnp.float32) for r in refs]
  tokens, ids, valid = pack_references(cfg, latents, scores, jnp.asarray(budgets), rung)
  img, _, lengths = with_target(cfg, jnp.asarray(target), (4, 4), tokens, ids, valid)
  n = target.shape[1]
  for b in range(2):
    kept = [r.latents[b, r.tokens - k:] if b == 0 else r.latents[b, :k] for r, k in zip(refs, budgets[b])]
    assert int(lengths[b]) == n + budgets[b].sum()
    assert np.array_equal(np.asarray(img[b, n:int(lengths[b])]), np.concatenate(kept))
  with pytest.raises(ValueError, match="2 score arrays given for 3 references"):
    pack_references(cfg, latents, scores[:2], jnp.asarray(budgets), rung)
