"""Image grids (the demo's figure): rows of uint8 tiles under column titles, as one PNG; and the kept-token overlay
of a reference."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparse_context_jax.images import encode_png

GAP, TITLE, BACKGROUND = 4, 14, 255


def kept_overlay(pixels: np.ndarray, kept: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(H, W, 3) uint8 with the tokens not in `kept` (flat raster indices into the (h, w) token `grid`) dimmed to a
  quarter: which tokens of a reference the model saw."""
  h, w = grid
  mask = np.zeros(h * w, bool)
  mask[np.asarray(kept, int)] = True
  H, W = pixels.shape[:2]
  mask = np.repeat(np.repeat(mask.reshape(h, w), H // h, axis=0), W // w, axis=1)
  return np.where(mask[..., None], pixels, pixels // 4).astype(np.uint8)


def grid_png(rows: list[list[np.ndarray | None]], titles: list[str], tile: int = 96) -> bytes:
  """A PNG of `rows` (each a list of (h, w, 3) uint8 images, or None for an empty cell), every image scaled by
  nearest neighbour into a `tile` x `tile` cell, under one title per column."""
  if any(len(r) != len(titles) for r in rows):
    raise ValueError(f"every row needs {len(titles)} cells (one per title)")
  cols = len(titles)
  canvas = Image.new("RGB", (cols * tile + (cols + 1) * GAP, TITLE + len(rows) * (tile + GAP) + GAP),
                     (BACKGROUND,) * 3)
  draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
  for c, title in enumerate(titles):
    draw.text((GAP + c * (tile + GAP), 1), title, fill=(0, 0, 0), font=font)
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      if image is not None:
        cell = Image.fromarray(np.asarray(image, np.uint8)).resize((tile, tile), Image.NEAREST)
        canvas.paste(cell, (GAP + c * (tile + GAP), TITLE + GAP + r * (tile + GAP)))
  return encode_png(np.asarray(canvas))
