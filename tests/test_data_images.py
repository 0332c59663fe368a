"""Image conversion (every PIL mode a user's folder may hold), corrupt files, buckets and resize + centre-crop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sparse_context_jax.data.buckets import aspect_buckets, nearest_bucket
from sparse_context_jax.images import crop_box, resize_crop
from sparse_context_jax.images import ImageError, canonical_image, canonical_mask, load_image, load_mask

RNG = np.random.default_rng(0)
H, W = 17, 23   # odd sizes on purpose


def _save(img: Image.Image, path, fmt="PNG", **kw):
  img.save(path, format=fmt, **kw)
  return path


def test_grayscale_becomes_three_equal_channels(tmp_path):
  grey = RNG.integers(0, 256, (H, W), dtype=np.uint8)
  out = load_image(_save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
  assert out.shape == (H, W, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))


def test_rgba_is_composited_over_white(tmp_path):
  rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
  rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
  out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")).astype(float)
  alpha = rgba[..., 3:] / 255
  np.testing.assert_allclose(out, alpha * rgba[..., :3] + (1 - alpha) * 255, atol=1)
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])       # fully transparent: white, not hidden colour
  np.testing.assert_array_equal(out[0, 1], rgba[0, 1, :3])


def test_palette_with_transparency(tmp_path):
  index = RNG.integers(0, 3, (H, W), dtype=np.uint8)
  img = Image.fromarray(index, "P")
  img.putpalette([200, 10, 10, 10, 200, 10, 0, 0, 0] + [0] * (256 * 3 - 9))
  out = load_image(_save(img, tmp_path / "p.png", transparency=2))
  expected = np.array([[200, 10, 10], [10, 200, 10], [255, 255, 255]], np.uint8)[index]
  np.testing.assert_array_equal(out, expected)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
  deep = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
  deep[0, 0], deep[0, 1] = 0, 65535
  path = _save(Image.fromarray(deep), tmp_path / "d.png")
  assert Image.open(path).mode.startswith("I")
  out = load_image(path)
  np.testing.assert_array_equal(out[..., 0], np.rint(deep * (255 / 65535)).astype(np.uint8))
  np.testing.assert_array_equal(load_mask(path), out[..., 0])


def test_jpegs_of_odd_sizes(tmp_path):
  rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
  path = _save(Image.fromarray(rgb), tmp_path / "c.jpg", "JPEG", quality=95)
  data, size = canonical_image(path)
  assert size == (H, W) and data == path.read_bytes()                 # upright RGB JPEG: stored untouched
  np.testing.assert_array_equal(load_image(data), np.asarray(Image.open(path)))
  grey = _save(Image.fromarray(rgb[..., 0]), tmp_path / "g.jpg", "JPEG")
  assert load_image(canonical_image(grey)[0]).shape == (H, W, 3)
  cmyk = _save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "k.jpg", "JPEG")
  assert np.abs(load_image(cmyk).astype(int) - rgb).mean() < 12


def test_jpeg_exif_orientation_is_applied(tmp_path):
  rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6   # "rotate 90 degrees clockwise to display"
  path = _save(Image.fromarray(rgb), tmp_path / "r.jpg", "JPEG", exif=exif.tobytes())
  data, size = canonical_image(path)
  assert size == (W, H) and load_image(data).shape == (W, H, 3)


def test_mask_conversions(tmp_path):
  bits = RNG.random((H, W)) > 0.5
  out, size = canonical_mask(_save(Image.fromarray(bits), tmp_path / "m.png"))
  assert size == (H, W)
  np.testing.assert_array_equal(load_mask(out) > 0, bits)


@pytest.mark.parametrize("damage", ["random bytes", "truncated png", "truncated jpeg", "empty", "text"])
def test_corrupt_files_raise(tmp_path, damage):
  rgb = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG" if "jpeg" in damage else "PNG")
  data = {"random bytes": RNG.bytes(500), "truncated png": buf.getvalue()[:len(buf.getvalue()) // 2],
          "truncated jpeg": buf.getvalue()[:len(buf.getvalue()) // 2], "empty": b"",
          "text": b"hello, not an image"}[damage]
  path = tmp_path / "bad.png"
  path.write_bytes(data)
  with pytest.raises(ImageError, match="unreadable image"):
    canonical_image(path)
  with pytest.raises(ImageError, match="file not found"):
    load_image(tmp_path / "missing.png")


def test_buckets_are_multiples_of_16_near_the_area():
  buckets = aspect_buckets(512)
  assert (512, 512) in buckets and len(set(buckets)) == len(buckets)
  for h, w in buckets:
    assert h % 16 == 0 and w % 16 == 0 and 0.85 < h * w / 512 ** 2 < 1.15
  assert buckets[nearest_bucket((1080, 1920), buckets)] == (384, 688)
  assert buckets[nearest_bucket((1000, 999), buckets)] == (512, 512)
  with pytest.raises(ValueError, match="multiple of 16"):
    aspect_buckets(500)


def test_resize_crop_keeps_the_centre_and_masks_aligned():
  # A 60x100 image whose centre 60x60 square (plus the bicubic filter's reach, ~4 px) is marked, as colour and as
  # mask: after cropping to a square bucket the marked region fills the output, in the image and its mask alike.
  img = np.zeros((60, 100, 3), np.uint8)
  mask = np.zeros((60, 100), np.uint8)
  img[:, 16:84], mask[:, 16:84] = 200, 255
  assert crop_box((60, 100), (32, 32)) == (20.0, 0.0, 80.0, 60.0)
  out_img, out_mask = resize_crop(img, (32, 32)), resize_crop(mask, (32, 32))
  assert out_img.shape == (32, 32, 3) and out_mask.shape == (32, 32)
  assert out_img.min() == 200 and out_mask.min() == 255
  assert resize_crop(img[:, :80], (32, 32)).min() < 200   # an off-centre crop does reach the unmarked side
  # An off-centre square lands at the same place in image and mask.
  img[:], mask[:] = 0, 0
  img[10:30, 30:50], mask[10:30, 30:50] = 255, 255
  np.testing.assert_array_equal(resize_crop(img, (48, 64))[..., 0], resize_crop(mask, (48, 64)))
