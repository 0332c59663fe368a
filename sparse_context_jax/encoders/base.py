"""The encoder protocols and the one pixel normalisation.

An image encoder turns pixels in [-1, 1] into the MMDiT's image tokens (normalised, FLUX-packed, raster order) and
back; a text encoder turns prompts into `PromptEmbeddings`. `Encoders` pairs an image side that yields unpacked
latents with a text side that yields named arrays: what `precompute` stores per record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np


def unit_range(pixels) -> np.ndarray:
  """uint8 pixels (any shape) -> float32 in [-1, 1]: what every encoder reads."""
  return np.asarray(pixels, np.float32) / 127.5 - 1.0


def to_uint8(pixels) -> np.ndarray:
  """Inverse of `unit_range`: float pixels in [-1, 1] (clipped) -> uint8."""
  return np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class PromptEmbeddings:
  """A batch of prompts as the MMDiT reads them.

  txt: (B, T, context_dim) float32; y: (B, pooled_dim) for FLUX.1, else None; txt_ids: (T, n_axes) or
  (B, T, n_axes), or None for the model's plain text ids (`model.positions.text_ids`); truncated: per prompt,
  whether its tokens were cut at T (empty when unknown; metadata, not a pytree leaf).
  """

  txt: np.ndarray
  y: np.ndarray | None = None
  txt_ids: np.ndarray | None = None
  truncated: tuple[bool, ...] = ()


jax.tree_util.register_dataclass(PromptEmbeddings, data_fields=["txt", "y", "txt_ids"], meta_fields=["truncated"])


def prompt_arrays(emb: PromptEmbeddings) -> dict[str, np.ndarray]:
  """The named arrays `precompute` stores for a batch of prompts: `embeddings` (N, T, D), `pooled` (N, P)."""
  return {"embeddings": np.asarray(emb.txt, np.float32),
          **({"pooled": np.asarray(emb.y, np.float32)} if emb.y is not None else {})}


class ImageEncoder(Protocol):
  """pixels (B, H, W, 3) float in [-1, 1], H and W multiples of 16 -> tokens (B, H W / 256, token_channels), and
  back (`decode(tokens, (H, W))` -> (B, H, W, 3) float in [-1, 1]). `name` identifies it in run records;
  `token_pixels` is the side of the pixel patch one token covers (16 for FLUX; a test VAE may have another)."""

  name: str
  token_channels: int
  token_pixels: int

  def encode(self, pixels): ...

  def decode(self, tokens, size: tuple[int, int]): ...


class TextEncoder(Protocol):
  """prompts -> `PromptEmbeddings` of `length` tokens (`context_dim`, and `pooled_dim` when > 0)."""

  name: str

  def __call__(self, prompts: Sequence[str]) -> PromptEmbeddings: ...


@dataclasses.dataclass(frozen=True)
class Encoders:
  """What `precompute` runs. image: (N, H, W, 3) float32 in [-1, 1] -> (N, h, w, C) normalised latents (packed into
  tokens by whoever feeds the model); text: list of N captions -> dict of (N, ...) arrays. `name` is recorded in the
  output so latents of different encoders are never mixed."""

  name: str
  image: Callable[[np.ndarray], np.ndarray]
  text: Callable[[list[str]], dict[str, np.ndarray]]
  # {"image": ..., "text": ...}: how a run trained on the output names these encoders (encoders/records.py), so
  # `generate` can build them again; None when they cannot be named (e.g. a module:attribute of your own).
  record: dict | None = None
