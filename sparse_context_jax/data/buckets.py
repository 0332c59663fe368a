"""Aspect-ratio buckets (the resize + centre-crop that puts an image into one is `images.resize_crop`).

XLA compiles one program per shape, and a batch must have one shape, so every example is resized to one of a few
(height, width) buckets: each about `resolution`^2 pixels, sides multiples of 16 (one FLUX token is 16x16 pixels),
aspect ratios from a short list. An example goes to the bucket nearest its target's aspect ratio (in log space);
its references and masks are put into the same bucket, so one example has one shape too.
"""

from __future__ import annotations

import math

from sparse_context_jax.model.positions import TOKEN_PIXELS

# height:width ratios; a short list keeps the number of compiled programs (and half-empty last batches) small.
ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9))
MULTIPLE = TOKEN_PIXELS


def aspect_buckets(resolution: int, aspects=ASPECTS) -> tuple[tuple[int, int], ...]:
  """(height, width) per aspect ratio, each side a multiple of 16, area about resolution^2, duplicates dropped."""
  if resolution < MULTIPLE or resolution % MULTIPLE:
    raise ValueError(f"resolution {resolution} (expected a positive multiple of {MULTIPLE})")
  out = []
  for h_ratio, w_ratio in aspects:
    scale = resolution / math.sqrt(h_ratio * w_ratio)
    hw = tuple(max(MULTIPLE, MULTIPLE * round(r * scale / MULTIPLE)) for r in (h_ratio, w_ratio))
    if hw not in out:
      out.append(hw)
  return tuple(out)


def nearest_bucket(size: tuple[int, int], buckets) -> int:
  """Index of the bucket whose aspect ratio is nearest (in log space) to that of `size` = (height, width)."""
  ratio = math.log(size[0] / size[1])
  return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))
