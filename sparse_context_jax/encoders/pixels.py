"""The local mode's stand-in image encoder: FLUX-shaped tokens straight from pixels.

Every 16x16 patch (one FLUX token) is average-pooled to s x s x 3 values (channels = 3 s^2), the pixels of one
token together. Invertible at its resolution (a 16/s-times smaller image), so quality can be measured in pixels.
"""

from __future__ import annotations

import math

import numpy as np

from sparse_context_jax.model.positions import TOKEN_PIXELS


def token_side(channels: int) -> int:
  """s such that a token holds s x s x 3 pooled pixels; ValueError if `channels` is not 3 s^2 with s | 16."""
  s = math.isqrt(channels // 3)
  if 3 * s * s != channels or TOKEN_PIXELS % s:
    raise ValueError(f"pixel tokens need in_channels = 3 s^2 with s dividing {TOKEN_PIXELS} (3, 12, 48, 192, 768); "
                     f"got {channels}")
  return s


def _pool(x: np.ndarray, p: int) -> np.ndarray:
  """(..., H, W, C) -> (..., H/p, W/p, C): means of p x p blocks, as sums of whole-array slices (numpy's reduce over
  two strided axes is several times slower on these shapes)."""
  *lead, H, W, C = x.shape
  rows = x.reshape(*lead, H, W // p, p, C)
  out = rows[..., 0, :].copy()
  for k in range(1, p):
    out += rows[..., k, :]
  cols = out.reshape(*lead, H // p, p, W // p, C)
  out = cols[..., 0, :, :].copy()
  for k in range(1, p):
    out += cols[..., k, :, :]
  return out / (p * p)


class PixelTokens:
  """`encode(pixels)`: (..., H, W, 3) in [-1, 1] -> (..., H/16 * W/16, channels) float32 in [-1, 1], raster order;
  `decode(tokens, (H, W))` -> (..., H s/16, W s/16, 3), the pooled image (host numpy, no program)."""

  def __init__(self, channels: int):
    self.side = token_side(channels)
    self.token_channels = channels
    self.token_pixels = TOKEN_PIXELS
    self.name = f"pixel-tokens-{channels}"
    self.record = {"kind": "pixel-tokens", "channels": channels}   # how a run names it (encoders/records.py)

  def encode(self, pixels) -> np.ndarray:
    s = self.side
    x = np.asarray(pixels, np.float32)
    *lead, H, W, _ = x.shape
    p = TOKEN_PIXELS // s
    x = _pool(x, p).reshape(*lead, H // TOKEN_PIXELS, s, W // TOKEN_PIXELS, s, 3)
    # (..., h, s, w, s, 3) -> (..., h, w, s, s, 3): the pixels of one token together, as FLUX packs 2x2 latents.
    x = np.moveaxis(x, -4, -3)
    return x.reshape(*lead, (H // TOKEN_PIXELS) * (W // TOKEN_PIXELS), self.token_channels)

  def decode(self, tokens, size: tuple[int, int]) -> np.ndarray:
    s, (h, w) = self.side, (size[0] // TOKEN_PIXELS, size[1] // TOKEN_PIXELS)
    x = np.asarray(tokens, np.float32)
    *lead, _, _ = x.shape
    x = np.moveaxis(x.reshape(*lead, h, w, s, s, 3), -3, -4)
    return np.clip(x.reshape(*lead, h * s, w * s, 3), -1, 1)
