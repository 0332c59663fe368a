"""Stand-in encoders for the local mode, until the Flax text encoders land (and for tests without a VAE).

- `pixel_tokens`: image -> FLUX-packed tokens straight from pixels: every 16x16 patch (one FLUX token) average-
  pooled to s x s x 3 values (channels = 3 s^2), scaled to [-1, 1]. Invertible to a 16/s-times smaller image,
  so quality can be measured in pixels.
- `HashedText`: caption -> (T, context_dim) features: one fixed random vector per word (seeded by the word's
  CRC32), zero padding; the pooled vector (FLUX.1's CLIP slot) is the mean of a second set. It carries the words,
  not their meaning: enough for the synthetic world, whose captions are short templates.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np


def token_side(channels: int) -> int:
  """s such that a token holds s x s x 3 pooled pixels; ValueError if `channels` is not 3 s^2 with s | 16."""
  s = math.isqrt(channels // 3)
  if 3 * s * s != channels or 16 % s:
    raise ValueError(f"pixel tokens need in_channels = 3 s^2 with s dividing 16 (3, 12, 48, 192, 768); "
                     f"got {channels}")
  return s


def pixel_tokens(images: np.ndarray, channels: int) -> np.ndarray:
  """(..., H, W, 3) uint8 -> (..., H/16 * W/16, channels) float32 in [-1, 1], raster order."""
  s = token_side(channels)
  *lead, H, W, _ = images.shape
  p = 16 // s
  x = images.astype(np.float32).reshape(*lead, H // 16, s, p, W // 16, s, p, 3).mean(axis=(-5, -2))
  # (..., h, s, w, s, 3) -> (..., h, w, s, s, 3): the pixels of one token together, as FLUX packs 2x2 latents.
  x = np.moveaxis(x, -4, -3)
  return (x.reshape(*lead, (H // 16) * (W // 16), channels) / 127.5 - 1).astype(np.float32)


def pixels_from_tokens(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
  """Inverse of `pixel_tokens` at its resolution: (..., N, channels) -> (..., H*s/16, W*s/16, 3) float in
  [0, 255]."""
  *lead, _, channels = tokens.shape
  s, h, w = token_side(channels), height // 16, width // 16
  x = tokens.reshape(*lead, h, w, s, s, 3)
  x = np.moveaxis(x, -3, -4).reshape(*lead, h * s, w * s, 3)
  return np.clip((x + 1) * 127.5, 0, 255)


class HashedText:
  """Caption -> text features (see the module docstring). `__call__(captions)` -> (txt (B, T, D), y (B, P))."""

  def __init__(self, length: int, dim: int, pooled_dim: int = 0):
    self.length, self.dim, self.pooled_dim = length, dim, pooled_dim

  @functools.lru_cache(maxsize=4096)
  def _word(self, word: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(word.encode("utf-8")))
    return (rng.standard_normal(self.dim).astype(np.float32),
            rng.standard_normal(self.pooled_dim).astype(np.float32))

  def __call__(self, captions) -> tuple[np.ndarray, np.ndarray]:
    txt = np.zeros((len(captions), self.length, self.dim), np.float32)
    y = np.zeros((len(captions), self.pooled_dim), np.float32)
    for b, caption in enumerate(captions):
      words = str(caption).lower().replace(",", " ").split()[:self.length]
      for i, word in enumerate(words):
        txt[b, i], pooled = self._word(word)
        y[b] += pooled / max(1, len(words))
    return txt, y


def pixel_grid(raw: dict) -> tuple[int, int]:
  """(h, w) in tokens of a pixel batch's target (and of its references, one bucket): 16x16 pixels a token."""
  return raw["target"].shape[1] // 16, raw["target"].shape[2] // 16


def host_batch(raw: dict, cfg, text: HashedText) -> dict:
  """A pipeline batch (pixels, captions) -> this process's model batch (numpy; see `objective.loss_sums`)."""
  txt, y = text([str(c) for c in raw["caption"]])
  batch = {"target": pixel_tokens(raw["target"], cfg.in_channels),
           "refs": pixel_tokens(raw["references"], cfg.in_channels),
           "ref_valid": raw["ref_valid"], "txt": txt, "weight": raw["valid"].astype(np.float32)}
  if cfg.pooled_dim:
    batch["y"] = y
  return batch
