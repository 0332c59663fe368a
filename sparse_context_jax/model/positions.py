"""Image tokens and their position ids.

A FLUX image token covers TOKEN_PIXELS x TOKEN_PIXELS = 16 x 16 pixels: the VAE downsamples 8x and the
transformer packs 2x2 latents into one token.

Position ids: FLUX.1: text (0, 0, 0); target (0, r, c); Kontext reference (1, r, c). FLUX.2: text (0, 0, 0, l);
target (0, r, c, 0); reference i (10 + 10 i, r, c, 0). Every image grid restarts at (0, 0), whatever its size.
"""

from __future__ import annotations

import numpy as np

from sparse_context_jax.model.config import MMDiTConfig


TOKEN_PIXELS = 16


def token_grid(size) -> tuple[int, int]:
  """(H, W) pixels -> (h, w) tokens (the caller has checked that H and W are multiples of TOKEN_PIXELS)."""
  return int(size[0]) // TOKEN_PIXELS, int(size[1]) // TOKEN_PIXELS


def reference_index(cfg: MMDiTConfig, i: int) -> int:
  """Value of the first id axis for reference image i (0-based)."""
  return 1 if cfg.family == "flux1" else 10 + 10 * i


def image_ids(cfg: MMDiTConfig, height: int, width: int, first: int = 0) -> np.ndarray:
  """(height * width, n_axes) float32 ids of a token grid in raster order."""
  r, c = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  cols = [np.full(height * width, first), r.ravel(), c.ravel()] + [np.zeros(height * width)] * (cfg.n_axes - 3)
  return np.stack(cols, axis=-1).astype(np.float32)


def text_ids(cfg: MMDiTConfig, length: int) -> np.ndarray:
  """(length, n_axes) float32 text ids: all zero for FLUX.1, the token index on the last axis for FLUX.2."""
  ids = np.zeros((length, cfg.n_axes), np.float32)
  if cfg.family == "flux2":
    ids[:, -1] = np.arange(length)
  return ids
