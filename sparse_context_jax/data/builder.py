"""Reference-pair datasets on disk: a tensorflow-datasets builder writing ArrayRecord shards (no tensorflow needed).

A dataset folder is what tfds writes for one builder version (`dataset_info.json`, `features.json`,
`metadata.json`, `reference_pairs-<split>.array_record-*`). Each record holds:
- `index` int64: the record's position in its split (0..n-1, written in order: shuffling happens at read time).
- `target` (H, W, 3) uint8; `references` list of 1..max_refs (h, w, 3) uint8; `masks` list (h, w, 1) uint8, one
  per reference or empty. Images are stored encoded (canonical PNG, or the original RGB JPEG).
- `caption` (bytes, utf-8), `task` (int, index into `TASKS`), `origin` (bytes: where the example came from).
`metadata.json` holds each record's target (height, width), so the pipeline can bucket by aspect ratio without
decoding anything, and the build's bookkeeping (max_refs, skipped manifest lines, what generated it).

`write_dataset` builds into a temporary sibling folder and renames it into place at the very end: a failed or
interrupted build leaves nothing at `out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorflow_datasets as tfds

from sparse_context_jax.data.manifest import MAX_REFS, TASKS, BadRow, ManifestRecords, read_manifest
from sparse_context_jax.progress import progress as progress_bar

SPLIT = "train"


class Records(Protocol):
  """What a dataset is written from: a manifest (`ManifestRecords`) or the synthetic world (`WorldRecords`)."""
  sizes: list[tuple[int, int]]   # each record's target (height, width), known before writing

  def __len__(self) -> int: ...

  def encoded(self, i: int) -> dict:
    """Record i: target (bytes), references (list of bytes), masks (list of bytes), caption, task, origin (str)."""


class ReferencePairs(tfds.core.GeneratorBasedBuilder):
  """tfds builder of reference-pair records; instantiated by `write_dataset`, read back by `open_dataset`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "target, 1..max_refs references, optional masks, caption, task"}

  def __init__(self, *, records: Records | None = None, split: str = SPLIT, metadata: dict | None = None,
               progress: bool = False, **kw):
    self._records, self._split, self._extra, self._progress = records, split, metadata or {}, progress
    super().__init__(**kw)

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Image(shape=(None, None, 3))
    return tfds.core.DatasetInfo(
        builder=self,
        description="Reference-conditioned generation: a target, its references, caption, task and masks.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "target": image,
            "references": tfds.features.Sequence(image),
            "masks": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 1))),
            "caption": tfds.features.Text(),
            "task": tfds.features.ClassLabel(names=TASKS),
            "origin": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        # Records stay in index order, so metadata["target_sizes"][i] describes record i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    self.info.metadata.update(self._extra, target_sizes=[list(s) for s in self._records.sizes])
    return {self._split: self._generate_examples()}

  def _generate_examples(self):
    with progress_bar(len(self._records), "build-dataset", "record", enabled=self._progress) as bar:
      for i in range(len(self._records)):
        r = self._records.encoded(i)
        yield f"{i:012d}", dict(index=i, target=r["target"], references=r["references"], masks=r["masks"],
                                caption=r["caption"], task=TASKS.index(r["task"]), origin=r["origin"])
        bar.update(1)


def write_dataset(records: Records, out: str | os.PathLike, *, split: str = SPLIT, max_refs: int = MAX_REFS,
                  metadata: dict | None = None, force: bool = False, progress: bool = False) -> Path:
  """Writes `records` as an ArrayRecord dataset folder at `out`; returns it. Refuses a non-empty `out` unless
  `force` (then replaces it, only once the new one is complete). `progress`: a bar on a terminal, lines
  otherwise."""
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
    raise FileExistsError(f"{os.fspath(out)!r} exists and is not empty (pass force to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    builder = ReferencePairs(records=records, split=split, data_dir=os.fspath(tmp), file_format="array_record",
                             metadata={"max_refs": max_refs, **(metadata or {})}, progress=progress)
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):   # tfds prints "Downloading and preparing" banners
      builder.download_and_prepare(download_dir=os.fspath(tmp / "downloads"))
    if out.exists():
      shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.rename(builder.data_dir, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An opened dataset folder: `source(split)` is a random-access data source of decoded records."""
  path: Path
  metadata: dict
  splits: tuple[str, ...]

  def source(self, split: str = SPLIT):
    if split not in self.splits:
      raise KeyError(f"split {split!r} not in {os.fspath(self.path)!r} (it has {list(self.splits)})")
    return tfds.builder_from_directory(os.fspath(self.path)).as_data_source(split)

  def __len__(self) -> int:
    return len(self.metadata["target_sizes"])

  @property
  def target_sizes(self) -> list[tuple[int, int]]:
    return [tuple(s) for s in self.metadata["target_sizes"]]


def open_dataset(path: str | os.PathLike) -> Dataset:
  """A folder written by `write_dataset`; raises FileNotFoundError naming it if it is not one."""
  path = Path(path)
  if not (path / "dataset_info.json").is_file() or not (path / "metadata.json").is_file():
    raise FileNotFoundError(f"{os.fspath(path)!r} is not a dataset folder (no dataset_info.json / metadata.json; "
                            "expected the output of build-dataset)")
  builder = tfds.builder_from_directory(os.fspath(path))
  return Dataset(path, dict(builder.info.metadata), tuple(builder.info.splits.keys()))


class BadManifest(ValueError):
  """A manifest with bad rows, built without skipping them; `bad` lists them by line."""

  def __init__(self, bad: list[BadRow], total: int):
    self.bad = bad
    shown = "; ".join(map(str, bad[:20])) + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    super().__init__(f"{len(bad)} bad row(s) of {total}: {shown}")


def build_from_manifest(manifest: str | os.PathLike, out: str | os.PathLike, *, max_refs: int = MAX_REFS,
                        skip_bad: bool = False, force: bool = False,
                        progress: bool = False) -> tuple[Path, int, list[BadRow]]:
  """Validates every row of a JSONL manifest and writes the dataset; returns (folder, records written, bad rows).

  Any bad row raises `BadManifest` (before anything is written) unless `skip_bad`, which writes the valid rows
  and records the skipped line numbers in the metadata. No valid row at all is an error either way.
  """
  rows, bad = read_manifest(manifest, max_refs)
  if bad and not skip_bad:
    raise BadManifest(bad, len(rows) + len(bad))
  if not rows:
    raise BadManifest(bad, len(bad)) if bad else ValueError(f"manifest {os.fspath(manifest)!r} has no rows")
  path = write_dataset(ManifestRecords(rows, manifest), out, max_refs=max_refs, force=force, progress=progress,
                       metadata={"generator": f"manifest {Path(manifest).name}",
                                 "skipped_lines": [b.line for b in bad]})
  return path, len(rows), bad
