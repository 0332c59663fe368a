"""Token scores of one reference, per selection strategy. Pure JAX, jittable.

A strategy produces scores and nothing else: `strategy_scores` returns `(B, M)` over the reference's tokens in
raster order (M = h * w), higher kept first; `budget_mass` what an adaptive budget measures. A token covers a
16x16-pixel patch (8x8 VAE latent x 2x2 packing), so pixel inputs are `(B, 16h, 16w, ...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("random", "grid", "edge", "saliency", "mask", "hybrid", "attention")
HYBRID_BASES = ("edge", "saliency", "mask", "attention")


def _patch_mean(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(B, 16h, 16w) -> (B, h * w): the mean over each token's patch, raster order."""
  h, w = grid
  B = x.shape[0]
  return x.reshape(B, h, x.shape[1] // h, w, x.shape[2] // w).mean(axis=(2, 4)).reshape(B, h * w)


def _gray(pixels: jax.Array) -> jax.Array:
  """(B, H, W, C) or (B, H, W) -> (B, H, W) float32."""
  p = pixels.astype(jnp.float32)
  return p.mean(axis=-1) if p.ndim == 4 else p


def random_scores(key: jax.Array, batch: int, grid: tuple[int, int]) -> jax.Array:
  """Uniform random scores: the training distribution and the baseline."""
  return jax.random.uniform(key, (batch, grid[0] * grid[1]))


def grid_order(grid: tuple[int, int]) -> np.ndarray:
  """(M,) rank of each token in a coverage order: ascending bit-reversed Morton code.

  Any prefix of this order is spread evenly: on a 2^n x 2^n grid the first M/4 tokens are exactly the stride-2
  sub-grid and the first M/16 the stride-4 one; other sizes get the same nested structure, clipped.
  """
  h, w = grid
  bits = max(1, int(np.ceil(np.log2(max(h, w)))))
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  r, c = r.ravel(), c.ravel()
  code = np.zeros_like(r)
  for b in range(bits):   # interleave (r_b, c_b) and reverse the bit order: low bits become most significant
    code |= ((c >> b) & 1) << (2 * bits - 1 - 2 * b)
    code |= ((r >> b) & 1) << (2 * bits - 2 - 2 * b)
  return np.argsort(np.argsort(code, kind="stable"), kind="stable")


def grid_scores(batch: int, grid: tuple[int, int]) -> jax.Array:
  """A uniform strided sub-grid at any budget (deterministic even coverage)."""
  m = grid[0] * grid[1]
  return jnp.broadcast_to(jnp.asarray(1.0 - grid_order(grid) / m, jnp.float32), (batch, m))


_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


def edge_scores(pixels: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Mean Sobel gradient magnitude of the grey image inside each token's patch (edge density).

  The border is replicated, so the image frame itself is no edge.
  """
  g = jnp.pad(_gray(pixels), ((0, 0), (1, 1), (1, 1)), mode="edge")[:, None]   # (B, 1, H+2, W+2)
  kernels = jnp.asarray(np.stack([_SOBEL_X, _SOBEL_X.T])[:, None])           # (2, 1, 3, 3)
  grad = jax.lax.conv_general_dilated(g, kernels, (1, 1), "VALID")           # (B, 2, H, W)
  magnitude = jnp.sqrt(jnp.sum(jnp.square(grad), axis=1) + 1e-12)
  return _patch_mean(magnitude, grid)


def _box3(x: jax.Array) -> jax.Array:
  """3x3 mean filter with wrap-around (the spectrum is periodic)."""
  return sum(jnp.roll(x, (dy, dx), axis=(-2, -1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """(B, H, W) separable Gaussian blur, edges replicated."""
  radius = int(np.ceil(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
  k = k / k.sum()
  x = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius)), mode="edge")[:, None]
  x = jax.lax.conv_general_dilated(x, jnp.asarray(k.reshape(1, 1, -1, 1)), (1, 1), "VALID")
  x = jax.lax.conv_general_dilated(x, jnp.asarray(k.reshape(1, 1, 1, -1)), (1, 1), "VALID")
  return x[:, 0]


def saliency_scores(pixels: jax.Array, grid: tuple[int, int], size: int = 64) -> jax.Array:
  """Spectral-residual saliency (Hou & Zhang, CVPR 2007), pooled per token.

  The grey image is resized to `size` x `size`; saliency = |IFFT(exp(R + i phase))|^2 with R the log amplitude
  minus its 3x3 local mean, blurred (sigma = size / 24), resized back to the image and averaged per patch.
  """
  g = _gray(pixels)
  B, H, W = g.shape
  small = jax.image.resize(g, (B, size, size), method="linear", antialias=True)
  f = jnp.fft.fft2(small)
  log_amplitude = jnp.log(jnp.abs(f) + 1e-8)
  residual = log_amplitude - _box3(log_amplitude)
  s = jnp.square(jnp.abs(jnp.fft.ifft2(jnp.exp(residual + 1j * jnp.angle(f)))))
  s = _gaussian_blur(s.astype(jnp.float32), size / 24)
  s = s / (jnp.max(s, axis=(1, 2), keepdims=True) + 1e-12)
  return _patch_mean(jax.image.resize(s, (B, H, W), method="linear"), grid)


def mask_coverage(mask: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(B, 16h, 16w) pixel or (B, h, w) token mask -> (B, h * w) fraction of each token inside the mask."""
  m = mask.astype(jnp.float32)
  return _patch_mean(m, grid) if m.shape[1:] != tuple(grid) else m.reshape(m.shape[0], -1)


def mask_scores(mask: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Fraction of each token's patch inside the mask; `mask` is (B, 16h, 16w) pixels or (B, h, w) tokens.

  Tokens touching the mask come first (any coverage > 0); the rest are ordered by the grid coverage order, so a
  budget beyond the mask spends itself on evenly spread context rather than on the top-left corner.
  """
  coverage = mask_coverage(mask, grid)
  # Scores in (1, 2] inside (by coverage), in (0, 1] outside (by coverage order): inside always ranks first.
  return jnp.where(coverage > 0, 1.0 + coverage, grid_scores(mask.shape[0], grid))


def hybrid_scores(base: jax.Array, grid: tuple[int, int], grid_share: float) -> jax.Array:
  """Spends `grid_share` of any budget on grid coverage and the rest on `base` scores.

  Two rankings advance at rates `grid_share` and `1 - grid_share`; a token is taken when either reaches it
  (time = min(rank_grid / share, rank_base / (1 - share))), so every prefix of the merged order holds about
  share * k grid tokens, the rest by score, without a per-budget loop.
  """
  B, m = base.shape
  rank_grid = jnp.asarray(grid_order(grid), jnp.float32)[None]
  iota = jnp.broadcast_to(jnp.arange(m), (B, m))
  order = jax.lax.sort((-base, iota), dimension=1, num_keys=2)[1]
  rank_base = jnp.zeros((B, m), jnp.float32).at[jnp.arange(B)[:, None], order].set(
      jnp.broadcast_to(jnp.arange(m, dtype=jnp.float32), (B, m)))
  time = jnp.minimum(rank_grid / max(grid_share, 1e-9), rank_base / max(1.0 - grid_share, 1e-9))
  return -time


def strategy_scores(strategy: str, ref: dict, grid: tuple[int, int], key, hybrid_base: str = "edge",
                    grid_share: float = 0.25) -> jax.Array:
  """(B, M) scores of one reference under `strategy`; `ref` holds `latents` (B, M, C) and the `pixels` / `mask` /
  `attention` (the model's attention mass, `model.attention_mass`) the strategy reads; `key` drives `random`."""
  batch = ref["latents"].shape[0]
  if strategy == "random":
    return random_scores(key, batch, grid)
  if strategy == "grid":
    return grid_scores(batch, grid)
  if strategy == "edge":
    return edge_scores(ref["pixels"], grid)
  if strategy == "saliency":
    return saliency_scores(ref["pixels"], grid)
  if strategy == "mask":
    return mask_scores(ref["mask"], grid)
  if strategy == "hybrid":
    return hybrid_scores(strategy_scores(hybrid_base, ref, grid, key), grid, grid_share)
  if strategy == "attention":   # computed by the model beforehand (`model.attention_mass`): a reference input
    return ref["attention"].astype(jnp.float32)
  raise ValueError(f"strategy {strategy!r} unknown; expected one of {STRATEGIES}")


def budget_mass(strategy: str, ref: dict, grid: tuple[int, int], hybrid_base: str = "edge") -> jax.Array:
  """(B, M) information of each token, what an adaptive budget measures: the base scores for edge and saliency
  (hybrid: its base's), the mask's coverage (not its ranking scores), uniform for random and grid (so tau acts as
  a keep ratio)."""
  if strategy == "hybrid":
    strategy = hybrid_base
  if strategy in ("edge", "saliency", "attention"):
    return strategy_scores(strategy, ref, grid, None)
  if strategy == "mask":
    return mask_coverage(ref["mask"], grid)
  return jnp.ones((ref["latents"].shape[0], grid[0] * grid[1]), jnp.float32)
