"""Selection strategies on synthetic images with a known answer; budgets; top-k order."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_context_jax.sparse import scores as S
from sparse_context_jax.sparse.select import adaptive_budget, top_k


def _kept(scores, k: int) -> set[int]:
  idx, valid = top_k(jnp.asarray(scores), jnp.asarray([k] * scores.shape[0]), k)
  return set(np.asarray(idx[0])[np.asarray(valid[0])].tolist())


def _disk_image(h=128, w=128, center=(40, 88), radius=22, seed=0):
  yy, xx = np.mgrid[0:h, 0:w]
  img = 0.5 + 0.02 * np.random.default_rng(seed).standard_normal((h, w))
  disk = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius ** 2
  img[disk] = 0.95
  return img.astype(np.float32), disk


def test_top_k_ties_and_order():
  scores = jnp.asarray([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
  idx, valid = top_k(scores, jnp.asarray([3]), 5)
  assert np.asarray(idx[0, :3]).tolist() == [0, 1, 3]      # 0.9, 0.9, then the first 0.5 by raster index
  assert np.asarray(valid[0]).tolist() == [True] * 3 + [False] * 2
  assert np.asarray(idx[0, 3:]).tolist() == [2, 5]         # the next best fill the padding slots
  with pytest.raises(ValueError, match="capacity 7 must be in"):
    top_k(scores, jnp.asarray([3]), 7)


def test_edge_keeps_the_patches_with_most_gradient_energy():
  rng = np.random.default_rng(0)
  img = np.full((96, 128), 0.3, np.float32)                 # 6 x 8 tokens, flat
  energies = {9: 1.0, 20: 0.6, 34: 0.3, 41: 0.15}           # token -> amplitude of a checkerboard texture
  checker = (np.indices((12, 12)).sum(0) % 2).astype(np.float32) - 0.5
  for t, a in energies.items():   # inset by 2 px, so a patch's texture leaves its neighbours flat
    r, c = divmod(t, 8)
    img[16 * r + 2:16 * r + 14, 16 * c + 2:16 * c + 14] += a * checker
  img += 0.001 * rng.standard_normal(img.shape).astype(np.float32)
  scores = S.edge_scores(jnp.asarray(np.repeat(img[None, ..., None], 3, -1)), (6, 8))
  for k in range(1, 5):
    assert _kept(scores, k) == set(sorted(energies, key=energies.get, reverse=True)[:k])


def test_mask_keeps_every_token_inside_when_the_budget_allows():
  mask = np.zeros((1, 64, 96), bool)
  mask[0, 5:37, 20:30] = True                               # touches tokens (0,1), (1,1), (2,1) ... and column 0
  inside = {r * 6 + c for r in range(4) for c in range(6)
            if mask[0, 16 * r:16 * r + 16, 16 * c:16 * c + 16].any()}
  scores = S.mask_scores(jnp.asarray(mask), (4, 6))
  assert _kept(scores, len(inside)) == inside
  assert _kept(scores, len(inside) + 4) >= inside
  token_mask = np.zeros((1, 4, 6), bool)
  token_mask[0, 1:3, 2:5] = True
  assert _kept(S.mask_scores(jnp.asarray(token_mask), (4, 6)), 6) == {8, 9, 10, 14, 15, 16}


def test_saliency_prefers_the_salient_object():
  img, disk = _disk_image()
  scores = np.asarray(S.saliency_scores(jnp.asarray(img[None]), (8, 8)))[0]
  touches = disk.reshape(8, 16, 8, 16).any(axis=(1, 3)).ravel()
  kept = _kept(scores[None], int(touches.sum()))
  assert np.mean([touches[t] for t in kept]) >= 0.75
  assert scores[touches].mean() > 4 * scores[~touches].mean()


def test_hybrid_keeps_a_spread_out_share():
  # edge-like scores concentrated in the top-left quadrant; hybrid still covers every quadrant
  base = np.zeros((1, 64), np.float32)
  for t in (0, 1, 2, 8, 9, 10, 16, 17, 18):
    base[0, t] = 1.0 + t / 100
  grid_rank = S.grid_order((8, 8))
  base_rank = np.argsort(np.argsort(-base[0], kind="stable"), kind="stable")
  for share in (0.25, 0.5, 0.75):
    for k in (8, 16, 24):
      kept = _kept(S.hybrid_scores(jnp.asarray(base), (8, 8), share), k)
      # both rankings advance at their rates: the first share * (k - 2) grid tokens and the first
      # (1 - share) * (k - 2) scored tokens are always in
      assert {t for t in range(64) if grid_rank[t] < share * (k - 2)} <= kept
      assert {t for t in range(64) if base_rank[t] < (1 - share) * (k - 2)} <= kept
      if share * (k - 2) >= 4:
        assert len({(t // 8 >= 4, t % 8 >= 4) for t in kept}) == 4
  assert _kept(S.hybrid_scores(jnp.asarray(base), (8, 8), 0.0), 9) == set(np.argsort(-base[0])[:9].tolist())
  assert _kept(S.hybrid_scores(jnp.asarray(base), (8, 8), 1.0), 16) == set(np.flatnonzero(grid_rank < 16))


def test_grid_is_an_even_sub_grid():
  assert set(np.flatnonzero(S.grid_order((8, 8)) < 16)) == {r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)}
  assert set(np.flatnonzero(S.grid_order((8, 8)) < 4)) == {0, 4, 32, 36}
  assert sorted(S.grid_order((5, 7))) == list(range(35))


def test_random_is_seeded_and_deterministic():
  import jax
  a = S.random_scores(jax.random.PRNGKey(1), 2, (4, 4))
  b = S.random_scores(jax.random.PRNGKey(1), 2, (4, 4))
  c = S.random_scores(jax.random.PRNGKey(2), 2, (4, 4))
  assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a[0], a[1])


def test_adaptive_budget_grows_monotonically_with_tau():
  img, _ = _disk_image()
  scores = S.edge_scores(jnp.asarray(np.stack([img, img[::-1, ::-1] * 0.5])), (8, 8))
  taus = np.linspace(0.05, 1.0, 20)
  budgets = np.stack([np.asarray(adaptive_budget(scores, float(t), 1, 64)) for t in taus])
  assert np.all(np.diff(budgets, axis=0) >= 0)
  assert np.all(budgets[-1] == 64) and np.all(budgets[0] <= 8)
  clipped = np.asarray(adaptive_budget(scores, 0.05, 10, 12))
  assert np.all((clipped >= 10) & (clipped <= 12))
  flat = np.asarray(adaptive_budget(jnp.zeros((1, 64)), 0.5, 1, 64))
  assert flat.tolist() == [32]        # no information: uniform mass, tau acts as a keep ratio
  peaked = np.zeros((1, 64), np.float32)
  peaked[0, [3, 7]] = [3.0, 1.0]
  assert [int(adaptive_budget(jnp.asarray(peaked), t, 1, 64)[0]) for t in (0.5, 0.75, 0.8, 1.0)] == [1, 1, 2, 64]
