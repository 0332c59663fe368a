"""A PyTorch checkpoint on disk as one set of named tensors: a `.safetensors` file, or a diffusers model folder
(`config.json` + one safetensors file or index-sharded files). Only headers are read up front.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from sparse_context_jax.convert.safetensors_io import SafetensorsFile
from sparse_context_jax.errors import CheckpointError, format_keys

BFL_PREFIX = "model.diffusion_model."  # BFL / ComfyUI single files; stripped


class TensorSource:
  """Tensor names (BFL prefix stripped) -> the file holding them; `config` is the folder's config.json or None;
  `metadata` the union of the files' safetensors `__metadata__` string maps."""

  def __init__(self, description: str, files: dict[str, SafetensorsFile], where: dict[str, tuple[str, str]],
               config: dict | None):
    self.description, self.config = description, config
    self.metadata = {k: v for f in files.values() for k, v in f.metadata.items()}
    self._files, self._where = files, where  # where: name -> (file path, key in that file)
    self._arenas: list[np.ndarray | None] = [None, None]

  def keys(self) -> list[str]:
    return list(self._where)

  def _entry(self, name: str) -> tuple[SafetensorsFile, str]:
    path, key = self._where[name]
    return self._files[path], key

  def file_of(self, name: str) -> str:
    return self._where[name][0]

  def shape(self, name: str) -> tuple[int, ...]:
    f, key = self._entry(name)
    return f.shape(key)

  def dtype(self, name: str) -> np.dtype:
    f, key = self._entry(name)
    return f.dtype(key)

  def nbytes(self, name: str) -> int:
    f, key = self._entry(name)
    return f.nbytes(key)

  def read(self, name: str) -> np.ndarray:
    f, key = self._entry(name)
    return f.read(key)

  def read_group(self, names: list[str], arena: int | None = 0) -> dict[str, np.ndarray]:
    """Several tensors, read into buffer number `arena` (0 or 1), which the next `read_group` into the same arena
    overwrites: use (copy) them before then. Reusing the buffer keeps a streaming conversion from touching new
    memory for every layer. `arena=None`: into a new buffer of their own, which lives as long as they do."""
    spans = [f.span(key) for f, key in map(self._entry, names)]
    if arena is None:
      buffer = np.empty(sum(spans), np.uint8)
    else:
      # A new buffer when this one is too small, or over twice the size needed (sized for an earlier, larger group):
      # its memory then serves the arrays converted next, instead of fresh pages.
      if self._arenas[arena] is None or not sum(spans) <= self._arenas[arena].size <= 2 * sum(spans):
        self._arenas[arena] = None
        self._arenas[arena] = np.empty(sum(spans), np.uint8)
      buffer = self._arenas[arena]
    out, at = {}, 0
    for name, span in zip(names, spans):
      f, key = self._entry(name)
      out[name] = f.read(key, buffer[at:at + span])
      at += span
    return out

  def read_groups(self, groups: list[list[str]], once: Collection[int] = ()) -> Iterator[dict[str, np.ndarray]]:
    """`read_group` of each list of names in turn, the next one read in a background thread (the disk works while
    the caller converts): each dict is valid until the one after next is asked for, except those of the groups
    numbered in `once` (read into buffers of their own: a group read once has no buffer to share), valid for good."""
    arenas, n = [], 0
    for i in range(len(groups)):   # the other groups alternate between the two arenas
      arenas.append(None if i in once else n % 2)
      n += i not in once
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-reader") as reader:
      ahead = reader.submit(self.read_group, groups[0], arenas[0]) if groups else None
      for i in range(len(groups)):
        tensors = ahead.result()
        if i + 1 < len(groups):
          ahead = reader.submit(self.read_group, groups[i + 1], arenas[i + 1])
        yield tensors

  def close(self) -> None:
    self._arenas = [None, None]
    for f in self._files.values():
      f.close()


def read_json(path: Path) -> dict:
  try:
    d = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} is not a JSON object")
  return d


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
  """The safetensors files of a diffusers folder and, if sharded, the index's weight map (name -> file name)."""
  indexes = sorted(folder.glob("*.safetensors.index.json"))
  if len(indexes) > 1:
    raise CheckpointError(f"{folder} has several safetensors indexes: {', '.join(p.name for p in indexes)}")
  if indexes:
    weight_map = read_json(indexes[0]).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{indexes[0]} has no weight_map")
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
      raise CheckpointError(f"{indexes[0]} lists shard file(s) that do not exist: {', '.join(absent)}")
    return shards, weight_map
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{folder} holds no .safetensors file")
  if len(files) > 1:
    raise CheckpointError(f"{folder} holds several .safetensors files ({', '.join(p.name for p in files)}) "
                          "and no *.safetensors.index.json")
  return files, None


def open_source(path: str | os.PathLike) -> TensorSource:
  """Opens a checkpoint file or folder (a pipeline folder's `transformer/` subfolder is used when present)."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path} does not exist")
  config = None
  if path.is_dir():
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
      path = path / "transformer"
    if (path / "config.json").exists():
      config = read_json(path / "config.json")
    paths, weight_map = _weight_files(path)
  else:
    paths, weight_map = [path], None

  files: dict[str, SafetensorsFile] = {}
  try:
    for p in paths:
      files[str(p)] = SafetensorsFile(p)
    where: dict[str, tuple[str, str]] = {}
    for fpath, f in files.items():
      for key in f.keys():
        name = key[len(BFL_PREFIX):] if key.startswith(BFL_PREFIX) else key
        if name in where:
          raise CheckpointError(f"tensor {name!r} appears twice: {where[name][1]!r} in {where[name][0]} and "
                                f"{key!r} in {fpath}")
        where[name] = (fpath, key)
    if weight_map is not None:
      misplaced = [k for k, fname in weight_map.items() if k not in where or Path(where[k][0]).name != fname]
      unindexed = set(where) - set(weight_map)
      if misplaced or unindexed:
        raise CheckpointError(f"the index of {path} disagrees with its shards: "
                              f"{len(misplaced)} indexed tensor(s) not in the named shard ({format_keys(misplaced)}); "
                              f"{len(unindexed)} tensor(s) in shards but not in the index ({format_keys(unindexed)})")
  except Exception:
    for f in files.values():
      f.close()
    raise
  return TensorSource(str(path), files, where, config)
