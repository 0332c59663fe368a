"""Array copies of the converter, fast on large weights: transposes in cache-sized tiles, dtype casts fused into the
same pass, bfloat16 widened to float32 by moving bits.

numpy's own `a.T.copy()` walks one of the two arrays with a stride of a whole row and runs at a fraction of memory
speed on a weight matrix; copying tiles of 512 rows x 16 columns writes whole cache lines, keeps the rows being read
in cache and the pages being written in the TLB; large ones are split over two threads. Same-dtype copies move raw
bits as unsigned integers, so no floating-point conversion ever touches a value.
"""

from __future__ import annotations

import concurrent.futures

import ml_dtypes
import numpy as np

ROWS, COLS = 512, 16   # a tile of a transposing copy: 512 destination rows x 16 columns (~1-1.7 GB/s a core here)
PARALLEL_BYTES = 16 << 20   # transposes at least this big are split over two threads (numpy's copies free the GIL)
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_BF16, _F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
_POOL = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="transpose")


def _views(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
  """(destination, source, shift) to assign elementwise: raw bits where the dtypes agree, float32 bits from bfloat16
  bits (then shifted left by 16: `shift`), the arrays themselves for any other cast."""
  if src.dtype == dst.dtype:
    bits = _BITS[dst.dtype.itemsize]
    return dst.view(bits), src.view(bits), False
  if src.dtype == _BF16 and dst.dtype == _F32:
    return dst.view(np.uint32), src.view(np.uint16), True
  return dst, src, False


def _tiles(dst: np.ndarray, src: np.ndarray, rows: range) -> None:
  for i in rows:
    for j in range(0, src.shape[1], COLS):
      dst[i:i + ROWS, j:j + COLS] = src[i:i + ROWS, j:j + COLS]


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """`dst[...] = src` (same shape) in `dst`'s dtype; a 2-D `src` that is a transposed view is copied in tiles."""
  if src.shape != dst.shape:
    raise ValueError(f"copy of a {src.shape} array into a {dst.shape} one")
  if dst.ndim == 0 or dst.strides[-1] != dst.itemsize:  # bit views need a contiguous last axis
    dst[...] = src
    return
  d, s, shift = _views(dst, src)
  if src.ndim == 2 and src.strides[0] < src.strides[1]:   # a transposed view: in tiles
    starts = range(0, src.shape[0], ROWS)
    if dst.nbytes >= PARALLEL_BYTES and len(starts) > 1:
      half = len(starts) // 2
      list(_POOL.map(lambda part: _tiles(d, s, part), (starts[:half], starts[half:])))
    else:
      _tiles(d, s, starts)
  else:
    d[...] = s
  if shift:
    d <<= 16


def converted(src: np.ndarray, dtype: np.dtype | None = None, empty=np.empty) -> np.ndarray:
  """A C-contiguous copy of `src` (any view) in `dtype` (default: its own), in `empty(shape, dtype)`."""
  out = empty(src.shape, np.dtype(dtype or src.dtype))
  copy_into(out, src)
  return out
