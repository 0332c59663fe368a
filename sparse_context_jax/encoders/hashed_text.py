"""The local mode's stand-in text encoder: caption -> (T, context_dim) features, one fixed random vector per word
(seeded by the word's CRC32), zero padding; the pooled vector (FLUX.1's CLIP slot) is the mean of a second set. It
carries the words, not their meaning: enough for the synthetic world, whose captions are short templates.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import numpy as np

from sparse_context_jax.encoders.base import PromptEmbeddings


class HashedText:
  """`HashedText(length, dim, pooled_dim)(captions)` -> `PromptEmbeddings` (txt (B, length, dim), y (B, pooled_dim)
  or None when pooled_dim is 0)."""

  def __init__(self, length: int, dim: int, pooled_dim: int = 0):
    if length <= 0 or dim <= 0 or pooled_dim < 0:
      raise ValueError(f"stand-in text of length {length}, dim {dim}, pooled dim {pooled_dim} (expected > 0, > 0 "
                       "and >= 0: the model's context_dim and pooled_dim)")
    self.length, self.dim, self.pooled_dim = length, dim, pooled_dim
    self.name = f"hashed-text-{length}x{dim}" + (f"+{pooled_dim}" if pooled_dim else "")
    # How a run names it (encoders/records.py builds it again from this).
    self.record = {"kind": "hashed-text", "length": length, "dim": dim, "pooled_dim": pooled_dim}

  @functools.lru_cache(maxsize=4096)
  def _word(self, word: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(word.encode("utf-8")))
    return (rng.standard_normal(self.dim).astype(np.float32),
            rng.standard_normal(self.pooled_dim).astype(np.float32))

  @functools.lru_cache(maxsize=16384)
  def _caption(self, caption: str, length: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(word vectors (n <= length, dim), pooled vector, truncated) of one caption, computed once per caption."""
    every = caption.lower().replace(",", " ").split()
    words = every[:length]
    rows = [self._word(word) for word in words]
    txt = np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.dim), np.float32)
    pooled = np.zeros(self.pooled_dim, np.float32)
    for _, vector in rows:
      pooled += vector / max(1, len(words))
    return txt, pooled, len(every) > length

  def __call__(self, captions: Sequence[str], max_sequence_length: int | None = None) -> PromptEmbeddings:
    """`max_sequence_length`, as a prompt encoder takes it: at most that many of the `length` positions (default
    all); `truncated` tells which captions had more words than positions."""
    length = self.length if max_sequence_length is None else min(self.length, max_sequence_length)
    txt = np.zeros((len(captions), length, self.dim), np.float32)
    y = np.zeros((len(captions), self.pooled_dim), np.float32)
    truncated = []
    for b, caption in enumerate(captions):
      words, pooled, cut = self._caption(str(caption), length)
      txt[b, :len(words)], y[b] = words, pooled
      truncated.append(cut)
    return PromptEmbeddings(txt, y if self.pooled_dim else None, truncated=tuple(truncated))
