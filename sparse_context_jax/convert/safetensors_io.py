"""Reading and writing `.safetensors` files with numpy only (no torch), bfloat16 included.

Format: 8 bytes little-endian header length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [b, e]},
"__metadata__": {...}}`, then the data; offsets are relative to the end of the header.

Tensors are read with `os.preadv` into buffers the caller owns (and can reuse), not through a memory map: pages of
a file mapping stay resident (and count in the process RSS) until the map is closed. Where the file system allows,
reads use `O_DIRECT`: the disk writes straight into the buffer, with no copy through the page cache and no page
cache growth (on this project's 2-core VMs, filling new page-cache pages costs more CPU than the conversion).
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from sparse_context_jax.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit
ALIGN = 4096               # O_DIRECT reads: buffer address, file offset and length in multiples of this


class SafetensorsFile:
  """The header of one `.safetensors` file, validated against the file size, and reads of single tensors."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      self._fd = os.open(self.path, os.O_RDONLY)
    except OSError as e:
      raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
    self._direct = -1   # the O_DIRECT descriptor, opened at the first read; None where unsupported
    size = os.fstat(self._fd).st_size
    try:
      self.entries, self.metadata = self._parse_header(size)
    except Exception:
      self.close()
      raise

  def _parse_header(self, size: int):
    bad = lambda why: CheckpointError(f"{self.path} is not a valid safetensors file: {why}")
    if size < 8:
      raise bad(f"{size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
    if n > min(size - 8, _MAX_HEADER):
      raise bad(f"header length {n} exceeds the file size {size} (truncated or not safetensors)")
    try:
      header = json.loads(os.pread(self._fd, n, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
      raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    entries, data_size = {}, size - 8 - n
    for key, e in header.items():
      try:
        dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
      except (KeyError, TypeError, ValueError):
        raise bad(f"tensor {key!r} has a malformed entry {e!r}") from None
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise bad(f"tensor {key!r} {e['dtype']}{list(shape)} has data_offsets {[begin, end]} of the wrong length")
      if end > data_size:
        raise CheckpointError(f"{self.path} is truncated: tensor {key!r} ends at byte {8 + n + end} but the file "
                              f"has {size} bytes")
      entries[key] = (dtype, shape, 8 + n + begin)
    return entries, metadata

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self.entries[key][1]

  def dtype(self, key: str) -> np.dtype:
    return self.entries[key][0]

  def nbytes(self, key: str) -> int:
    dtype, shape, _ = self.entries[key]
    return math.prod(shape) * dtype.itemsize

  def span(self, key: str) -> int:
    """The bytes of a buffer `read(key, buffer)` needs: the tensor's whole aligned blocks, plus alignment slack."""
    _, _, offset = self.entries[key]
    start, end = offset - offset % ALIGN, -(-(offset + self.nbytes(key)) // ALIGN) * ALIGN
    return end - start + ALIGN

  def read(self, key: str, buffer: np.ndarray | None = None) -> np.ndarray:
    """The tensor `key`, C-contiguous: a view into `buffer` (uint8, at least `span(key)` bytes, which the caller
    may reuse once done with the tensor), or into a new buffer."""
    dtype, shape, offset = self.entries[key]
    n = self.nbytes(key)
    if buffer is None:
      buffer = np.empty(self.span(key), np.uint8)
    start = offset - offset % ALIGN
    blocks = self.span(key) - ALIGN
    first = -buffer.ctypes.data % ALIGN
    view = buffer[first:first + blocks]
    need = offset + n - start
    done = self._read_direct(view, start, need)
    while done < need:  # the rest (or all, without O_DIRECT) through the page cache; pread may return short counts
      got = os.preadv(self._fd, [view[done:need]], start + done)
      if got == 0:
        raise CheckpointError(f"{self.path} is truncated: reading tensor {key!r} hit the end of the file")
      done += got
    return view[offset - start:offset - start + n].view(dtype).reshape(shape)

  def _read_direct(self, view: memoryview, start: int, need: int) -> int:
    """Reads whole blocks from `start` with O_DIRECT while it works; returns the bytes read (0: not supported)."""
    if self._direct == -1:
      try:
        self._direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else None
      except OSError:
        self._direct = None
    done = 0
    while self._direct is not None and done < need and done % ALIGN == 0:
      try:
        got = os.preadv(self._direct, [view[done:]], start + done)
      except OSError as e:
        if e.errno != errno.EINVAL:
          raise
        os.close(self._direct)   # the file system refuses direct reads: buffered from now on
        self._direct = None
        break
      if got == 0:
        break
      done += got
    return min(done, need)

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1
    if getattr(self, "_direct", None) not in (None, -1):
      os.close(self._direct)
      self._direct = None

  def __del__(self):
    if getattr(self, "_fd", -1) >= 0:
      self.close()


class SafetensorsWriter:
  """Writes a `.safetensors` file whose tensor list is known up front, one tensor at a time, in any order.

  Args:
    path: the file to create.
    entries: (name, dtype, shape) of every tensor, in file order.
    metadata: string -> string `__metadata__` (e.g. {"format": "pt"}).
  """

  def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
               metadata: dict[str, str] | None = None):
    header, self._layout, offset = {}, {}, 0
    if metadata:
      header["__metadata__"] = dict(metadata)
    for name, dtype, shape in entries:
      dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      self._layout[name] = (dtype, shape, offset)
      offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start is 8-byte aligned, as safetensors writes it
    self._data_start = 8 + len(text)
    self.path = os.fspath(path)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)
    os.ftruncate(self._fd, self._data_start + offset)
    self._pending = set(self._layout)

  def write(self, name: str, array: np.ndarray) -> None:
    dtype, shape, offset = self._layout[name]
    if array.dtype != dtype or tuple(array.shape) != shape:
      raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, the header says {dtype}{list(shape)}")
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # bytes of any dtype (bfloat16)
    done = 0
    while done < len(data):
      done += os.pwrite(self._fd, data[done:], self._data_start + offset + done)
    self._pending.discard(name)

  def close(self) -> None:
    """Closes the file; every tensor must have been written."""
    os.close(self._fd)
    if self._pending:
      raise ValueError(f"{self.path}: {len(self._pending)} tensor(s) never written, e.g. {sorted(self._pending)[:3]}")


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
  """Writes a whole in-memory dict (small files, tests)."""
  w = SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata)
  for k, v in tensors.items():
    w.write(k, v)
  w.close()
