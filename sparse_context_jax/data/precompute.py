"""A dataset -> a latent dataset: VAE latents and text embeddings computed once, so training never re-runs the
encoders.

Encoders are pluggable (`encoders.Encoders`): `vae:PATH` is the project's Flax VAE (a converted VAE folder) with
the hashed stand-in text (real text encoders are still missing), `module:attr` names your own. `REAL_ENCODERS`
(named real image + text encoders) stays empty until the text encoders land, and the `precompute` command refuses
to run without an explicit `--encoders`.

Output folder: `latents.array_record` (one record per dataset record, bucket by bucket, padding never written) and
`latents.json` (count, encoder name, buckets, source), `shapes.npy` ((count, 2) int32: each record's latent
(h, w), so the training pipeline buckets records without reading them). A record is an `.npz` (numpy's own
format, no pickle):
- `index` int64, `task` int32, `caption` str;
- `target_latent` (h, w, C); `reference_latents` (R, h, w, C), unused slots zero; `ref_valid` (R,) bool;
- `mask_tokens` (R, H/16, W/16) float32: the fraction of each 16x16 patch inside the mask (what the `mask`
  selection strategy pools to); `mask_valid` (R,) bool;
- `text_<name>` for every array the text encoder returns (for example `text_embeddings` (T, D), `text_pooled`).
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from sparse_context_jax.data.builder import Dataset, open_dataset
from sparse_context_jax.data.pipeline import make_pipeline
from sparse_context_jax.encoders.base import Encoders, unit_range
from sparse_context_jax.model.positions import TOKEN_PIXELS
from sparse_context_jax.progress import progress as progress_bar

LATENTS_FILE, INFO_FILE, SHAPES_FILE = "latents.array_record", "latents.json", "shapes.npy"


# name -> factory of real image + text encoders; empty until the Flax text encoders land (a later issue).
REAL_ENCODERS: dict[str, Callable[[], Encoders]] = {}


def load_encoders(spec: str, *, text_len: int = 32, text_dim: int = 0, pooled_dim: int = 0) -> Encoders:
  """`name` of REAL_ENCODERS; `vae:PATH`, the converted Flax VAE at PATH with the hashed stand-in text of
  text_len x text_dim (and a pooled_dim vector when > 0; see `vae_encoders`); or `module:attribute` naming an
  `Encoders` or a function returning one."""
  if spec in REAL_ENCODERS:
    return REAL_ENCODERS[spec]()
  if spec.startswith("vae:"):
    return _vae_encoders(spec[len("vae:"):], text_len=text_len, text_dim=text_dim, pooled_dim=pooled_dim)
  module, _, attr = spec.partition(":")
  if not attr:
    raise ValueError(f"encoders {spec!r}: expected one of {sorted(REAL_ENCODERS)}, vae:PATH or module:attribute")
  try:
    found = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"encoders {spec!r}: cannot import ({e})") from None
  enc = found() if callable(found) and not isinstance(found, Encoders) else found
  if not isinstance(enc, Encoders):
    raise ValueError(f"encoders {spec!r} gave {type(enc).__name__}, expected an Encoders")
  return enc


def _vae_encoders(path: str, *, text_len: int, text_dim: int, pooled_dim: int) -> Encoders:
  """The converted VAE at `path` with the hashed stand-in text; ValueError if `path` is not a converted VAE."""
  from sparse_context_jax.convert import load
  from sparse_context_jax.encoders.hashed_text import HashedText
  from sparse_context_jax.encoders.vae import VAEImageEncoder, precompute_encoders
  from sparse_context_jax.errors import CheckpointError
  from sparse_context_jax.model.vae import AutoencoderKL
  text = HashedText(text_len, text_dim, pooled_dim)
  try:
    vae = load(path)
  except CheckpointError as e:
    raise ValueError(f"encoders vae:{os.fspath(path)}: {e}") from None
  if not isinstance(vae, AutoencoderKL):
    raise ValueError(f"encoders vae:{os.fspath(path)}: a converted {type(vae).__name__}, not a VAE")
  return precompute_encoders(VAEImageEncoder(vae, f"vae:{os.path.basename(os.path.abspath(path))}"), text)


def mask_tokens(masks: np.ndarray) -> np.ndarray:
  """(..., H, W) uint8 pixel masks -> (..., H/16, W/16) float32 fraction of each patch that is nonzero."""
  *lead, H, W = masks.shape
  p = TOKEN_PIXELS
  inside = (masks > 0).reshape(*lead, H // p, p, W // p, p)
  return inside.mean(axis=(-3, -1), dtype=np.float32)


def _encode_batch(batch: dict, enc: Encoders) -> list[dict]:
  """One pipeline batch -> the latent record of each valid example."""
  target = np.asarray(enc.image(unit_range(batch["target"])))
  valid_refs = batch["ref_valid"]
  ref_latents = np.asarray(enc.image(unit_range(batch["references"][valid_refs])))
  refs = np.zeros((*valid_refs.shape, *ref_latents.shape[1:]), ref_latents.dtype)
  refs[valid_refs] = ref_latents
  text = {k: np.asarray(v) for k, v in enc.text([str(c) for c in batch["caption"]]).items()}
  masks = mask_tokens(batch["masks"])
  return [dict(index=batch["index"][b], task=batch["task"][b], caption=batch["caption"][b],
               target_latent=target[b], reference_latents=refs[b], ref_valid=valid_refs[b],
               mask_tokens=masks[b], mask_valid=batch["mask_valid"][b], **{f"text_{k}": v[b] for k, v in text.items()})
          for b in np.flatnonzero(batch["valid"])]


def _npz(record: dict) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **record)
  return buf.getvalue()


def precompute(dataset: Dataset | str, out: str | os.PathLike, encoders: Encoders, *, batch_size: int = 8,
               resolution: int = 512, buckets=None, force: bool = False, progress: bool = False) -> int:
  """Encodes every record of `dataset` once (no shuffle, one epoch) into a latent folder at `out`; returns the
  record count. Built in a temporary sibling folder and renamed at the end: a failure leaves nothing at `out`.
  `progress`: a bar on a terminal, lines otherwise."""
  dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
    raise FileExistsError(f"{os.fspath(out)!r} exists and is not empty (pass force to replace it)")
  pipeline = make_pipeline(dataset, batch_size=batch_size, resolution=resolution, buckets=buckets, shuffle=False,
                           num_epochs=1)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    writer, count, shapes = ArrayRecordWriter(os.fspath(tmp / LATENTS_FILE), "group_size:1"), 0, []
    with progress_bar(len(dataset), "precompute", "record", enabled=progress) as bar:
      for batch in pipeline:   # streamed: memory holds one batch, not the dataset
        for record in _encode_batch(batch, encoders):
          writer.write(_npz(record))
          shapes.append(record["target_latent"].shape[:2])
          count += 1
          bar.update(1)
    writer.close()
    np.save(tmp / SHAPES_FILE, np.asarray(shapes, np.int32).reshape(-1, 2))
    info = dict(count=count, encoders=encoders.name, source=os.fspath(dataset.path),
                resolution=resolution, buckets=[list(b) for b in buckets] if buckets else None)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    if out.exists():
      shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return count


class Latents:
  """A latent folder, random access: `latents[i]` is record i as a dict of numpy arrays; `info` its json."""

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    if not (path / INFO_FILE).is_file():
      raise FileNotFoundError(f"{os.fspath(path)!r} is not a latent folder (no {INFO_FILE}; expected the output "
                              "of precompute)")
    self.path, self.info = path, json.loads((path / INFO_FILE).read_text())
    self._source = grain.sources.ArrayRecordDataSource([os.fspath(path / LATENTS_FILE)])

  def __len__(self) -> int:
    return len(self._source)

  @functools.cached_property
  def shapes(self) -> np.ndarray:
    """(len, 2) int32: the latent (h, w) of every record (read once)."""
    if not (self.path / SHAPES_FILE).is_file():
      raise FileNotFoundError(f"{os.fspath(self.path)!r} has no {SHAPES_FILE} (written by an older precompute: run "
                              "precompute again)")
    return np.load(self.path / SHAPES_FILE, allow_pickle=False)

  def __getitem__(self, i: int) -> dict:
    with np.load(io.BytesIO(self._source[i]), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
