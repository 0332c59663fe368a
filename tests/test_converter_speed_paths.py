"""The converter's fast paths give exactly what plain numpy gives: tiled transposes with fused casts (every bit
pattern, NaNs included), O_DIRECT reads and their buffered fallback, reused buffers, a failing background write."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

import reference as ref
from conftest import torch_model
from sparse_context_jax import load_model
from sparse_context_jax.convert import convert_checkpoint, model_params, params_from_state_dict
from sparse_context_jax.convert import checkpoint as checkpoint_lib
from sparse_context_jax.convert import arrays
from sparse_context_jax.convert.arrays import converted
from sparse_context_jax.convert.safetensors_io import ALIGN, SafetensorsFile, save_file
from sparse_context_jax.convert.sources import open_source

BF16 = np.dtype(ml_dtypes.bfloat16)
NAME = "flux2-klein-2ref"


def _bits(a: np.ndarray) -> bytes:
  return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("src_dtype", [BF16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dst_dtype", [BF16, np.float32])
@pytest.mark.parametrize("tiles", ["one", "many, two threads"])
def test_tiled_transposes_and_casts_equal_numpy_bit_for_bit(src_dtype, dst_dtype, tiles, monkeypatch):
  if tiles != "one":   # several row tiles, ragged at the end, split over the two transposing threads
    monkeypatch.setattr(arrays, "ROWS", 7)
    monkeypatch.setattr(arrays, "PARALLEL_BYTES", 0)
  rng = np.random.default_rng(0)
  itemsize = np.dtype(src_dtype).itemsize
  raw = rng.integers(0, 256, (77, 130 * itemsize), dtype=np.uint8)   # every bit pattern: NaNs, infs, subnormals
  x = raw.view(src_dtype)
  with np.errstate(all="ignore"):
    for view in (x, x.T, x[3:40, 5:].T, x.reshape(77, 10, 13).transpose(2, 0, 1)):
      want = np.asarray(view, dst_dtype)
      got = converted(view, dst_dtype)
      assert got.flags.c_contiguous and got.dtype == dst_dtype and got.shape == want.shape
      if np.dtype(src_dtype) in (BF16, np.dtype(dst_dtype)):   # exact bits (bfloat16 -> float32 widens exactly)
        assert _bits(got) == _bits(want)
      else:   # a rounding cast: the same values (NaN payloads may differ)
        assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("direct", [True, False])
def test_reads_with_and_without_o_direct_equal_the_file(tmp_path, monkeypatch, direct):
  if not direct:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
  rng = np.random.default_rng(1)
  # Odd sizes: tensors start and end off the alignment, the last one at the very end of the file.
  tensors = {f"t{i}": rng.standard_normal((n, 3)).astype(np.float32) for i, n in enumerate((1, 700, 5, 3000, 2))}
  save_file(tensors, tmp_path / "a.safetensors")
  f = SafetensorsFile(tmp_path / "a.safetensors")
  buffer = np.empty(max(f.span(k) for k in tensors) + ALIGN, np.uint8)
  for k, v in tensors.items():
    assert np.array_equal(f.read(k), v) and np.array_equal(f.read(k, buffer[1:]), v)   # a misaligned buffer too
  f.close()
  source = open_source(tmp_path / "a.safetensors")
  first = source.read_group(["t1", "t3"])
  assert all(np.array_equal(first[k], tensors[k]) for k in first)
  second = source.read_group(["t0", "t2", "t4"])   # the same buffer, reused
  assert all(np.array_equal(second[k], tensors[k]) for k in second)
  groups = [["t1", "t3"], ["t0"], ["t2", "t4"], ["t3"]]   # read ahead, alternating between two buffers
  for names, got in zip(groups, source.read_groups(groups), strict=True):
    assert list(got) == names and all(np.array_equal(got[k], tensors[k]) for k in names)
  kept = [got for got in source.read_groups(groups, once={0, 2})]   # groups read once keep buffers of their own
  for i in (0, 2):
    assert all(np.array_equal(kept[i][k], tensors[k]) for k in groups[i])
  assert not np.shares_memory(kept[0]["t1"], kept[1]["t0"]) and not np.shares_memory(kept[2]["t2"], kept[3]["t3"])
  source.close()


def _saved_model(tmp_path):
  """A tiny torch model, written as `tmp_path/m.safetensors` with its `config.json`."""
  tm = torch_model(NAME)
  save_file(ref.state_dict(tm), tmp_path / "m.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(dict(tm.config)))
  return tm


def _assert_loads_as(out, tm) -> None:
  """The converted folder `out` loads as exactly the torch model `tm`'s parameters."""
  got, want = model_params(load_model(out)), params_from_state_dict(ref.config_of(tm), ref.state_dict(tm))
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_conversion_without_o_direct_is_identical(tmp_path, monkeypatch):
  tm = _saved_model(tmp_path)
  monkeypatch.delattr(os, "O_DIRECT", raising=False)
  convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "out", config=str(tmp_path / "config.json"))
  _assert_loads_as(tmp_path / "out", tm)


def test_a_failing_background_write_leaves_nothing(tmp_path, monkeypatch):
  _saved_model(tmp_path)
  saves, original = [], checkpoint_lib.ocp_partial.save

  def failing_save(path, tree):
    saves.append(path)
    if len(saves) == 3:
      raise OSError("disk full")
    return original(path, tree)

  monkeypatch.setattr(checkpoint_lib.ocp_partial, "save", failing_save)
  monkeypatch.setattr(checkpoint_lib, "SAVE_BYTES", 1)   # a save per group: the third one fails midway
  with pytest.raises(OSError, match="disk full"):
    convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "out", config=str(tmp_path / "config.json"))
  assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("save_bytes", [1, None])   # a save per group; the default batches (here: one save)
def test_groups_saved_in_batches_convert_alike(tmp_path, monkeypatch, save_bytes):
  tm = _saved_model(tmp_path)
  saves, original = [], checkpoint_lib.ocp_partial.save
  monkeypatch.setattr(checkpoint_lib.ocp_partial, "save", lambda path, tree: (saves.append(tree), original(path, tree)))
  if save_bytes:
    monkeypatch.setattr(checkpoint_lib, "SAVE_BYTES", save_bytes)
  cfg = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "out", config=str(tmp_path / "config.json"))
  _assert_loads_as(tmp_path / "out", tm)
  groups = 1 + cfg.depth_double + cfg.depth_single   # the unstacked group, then one per layer
  assert len(saves) == (groups if save_bytes else 1)


def _data_files(ckpt) -> list:
  return [p for p in (ckpt / checkpoint_lib.PARAMS).rglob("*") if p.is_file() and p.parent.name == "d"]


def test_small_data_files_convert_alike(tmp_path, monkeypatch):
  """The writer splits a save into data files of `DATA_FILE_BYTES` (written and synced concurrently): the same
  weights come back from many small files as from a few."""
  tm = _saved_model(tmp_path)
  convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "default", config=str(tmp_path / "config.json"))
  monkeypatch.setattr(checkpoint_lib, "DATA_FILE_BYTES", 4 << 10)
  convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "small", config=str(tmp_path / "config.json"))
  small, default = len(_data_files(tmp_path / "small")), len(_data_files(tmp_path / "default"))
  assert small > 5 * default
  for out in ("default", "small"):
    _assert_loads_as(tmp_path / out, tm)
