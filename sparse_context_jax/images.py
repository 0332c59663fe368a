"""Image files -> canonical pixels (8-bit RGB images and 8-bit single-channel masks, whatever the file held), and
the resize + centre-crop into a target size.

Every image of a dataset goes through `load_image` / `load_mask` once, at build time, so the pipeline only ever
decodes canonical PNGs (or untouched RGB JPEGs). Conversions, and why:
- 16-bit (`I;16*`, `I`) greyscale is scaled by 255 / 65535, not clipped: `PIL.Image.convert` would saturate it.
- Alpha (RGBA, LA, palette with transparency) is composited over white: dropping it would expose whatever colour
  the encoder left under transparent pixels.
- JPEG EXIF orientation is applied, so a phone photo is upright.
A file PIL cannot fully decode (corrupt, truncated, not an image) raises `ImageError`.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

# PIL's own guard against decompression bombs warns below the limit; a warning there is a bad row for us too.
_MAX_PIXELS = 1 << 28


class ImageError(ValueError):
  """The file is missing, unreadable or not a decodable image."""


def _open(source: str | os.PathLike | bytes) -> Image.Image:
  """Fully decoded PIL image (load() forces the decode, so truncation is caught here, not later)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
      img.load()
  except FileNotFoundError:
    raise ImageError("file not found") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
    raise ImageError(f"unreadable image ({type(e).__name__}: {e})") from None
  if img.width * img.height > _MAX_PIXELS:
    raise ImageError(f"image of {img.width}x{img.height} pixels is larger than {_MAX_PIXELS} pixels")
  return img


def _to_8bit(img: Image.Image) -> Image.Image:
  """High-bit-depth single-channel modes scaled (not clipped) to L; every other mode unchanged."""
  if img.mode.startswith("I;16") or img.mode == "I":
    a = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a * (255 / 65535)), 0, 255).astype(np.uint8), "L")
  if img.mode == "F":
    a = np.asarray(img, np.float64)
    return Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8), "L")
  return img


def rgb(img: Image.Image) -> np.ndarray:
  """A decoded PIL image of any mode -> (H, W, 3) uint8, alpha composited over white."""
  img = _to_8bit(ImageOps.exif_transpose(img))
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  return np.asarray(img.convert("RGB"), np.uint8)


def grey(img: Image.Image) -> np.ndarray:
  """A decoded PIL image of any mode -> (H, W) uint8 luminance (a mask: nonzero is inside)."""
  img = _to_8bit(ImageOps.exif_transpose(img))
  if img.mode in ("RGBA", "LA", "PA", "P"):
    img = Image.fromarray(rgb(img))
  return np.asarray(img.convert("L"), np.uint8)


def load_image(source: str | os.PathLike | bytes) -> np.ndarray:
  """(H, W, 3) uint8 RGB of an image file (path or bytes); raises `ImageError`."""
  return rgb(_open(source))


def load_mask(source: str | os.PathLike | bytes) -> np.ndarray:
  """(H, W) uint8 of a mask file (path or bytes); raises `ImageError`."""
  return grey(_open(source))


def encode_png(pixels: np.ndarray) -> bytes:
  """(H, W, 3) or (H, W) uint8 -> PNG bytes (lossless; fast compression, the dataset is read far more than
  written but decode time does not depend on the level)."""
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def canonical_image(path: str | os.PathLike) -> tuple[bytes, tuple[int, int]]:
  """The bytes to store for an image file and its (height, width) after conversion.

  An upright 8-bit RGB JPEG is stored untouched (re-encoding would lose quality and grow it); anything else is
  converted by `rgb` and stored as PNG.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ImageError("file not found") from None
  except OSError as e:
    raise ImageError(f"cannot read ({e.strerror or e})") from None
  img = _open(data)
  orientation = img.getexif().get(0x0112, 1) if img.format == "JPEG" else 1
  if img.format == "JPEG" and img.mode == "RGB" and orientation == 1:
    return data, (img.height, img.width)
  pixels = rgb(img)
  return encode_png(pixels), pixels.shape[:2]


def canonical_mask(path: str | os.PathLike) -> tuple[bytes, tuple[int, int]]:
  """PNG bytes of a mask file converted by `grey`, and its (height, width)."""
  pixels = load_mask(path)
  return encode_png(pixels), pixels.shape[:2]


def crop_box(size: tuple[int, int], out: tuple[int, int]) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of the centred region of an image of `size` = (h, w) with `out`'s aspect ratio."""
  (h, w), (H, W) = size, out
  scale = min(h / H, w / W)
  ch, cw = H * scale, W * scale
  return ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)


def resize_crop(pixels: np.ndarray, out: tuple[int, int]) -> np.ndarray:
  """(h, w, 3) or (h, w) uint8 -> (H, W, ...) uint8: the centred crop of out's aspect ratio, resized to `out`.

  Bicubic with PIL's antialiasing (its filter widens when shrinking), so downscaling does not alias. The crop box
  is fractional and passed to the resize, so an image and its mask of the same size land on the same pixels.
  """
  img = Image.fromarray(pixels)
  box = crop_box(pixels.shape[:2], out)
  if pixels.shape[:2] == tuple(out):
    return pixels
  return np.asarray(img.resize((out[1], out[0]), Image.Resampling.BICUBIC, box=box))
