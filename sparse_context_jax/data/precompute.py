"""A dataset -> a latent dataset: VAE latents and text embeddings computed once, so training never re-runs the
encoders.

Encoders are pluggable (`encoders.Encoders`): `vae:PATH,text:PATH` is the project's Flax VAE and text encoder(s)
(converted folders), `vae:PATH` alone pairs the VAE with the hashed stand-in text (the local mode's), and
`module:attr` names your own.

Output folder: `latents.array_record` (one record per dataset record, bucket by bucket, padding never written) and
`latents.json` (count, encoder name and record (`Encoders.record`: the VAE folder and the text encoders, for the
runs trained on it), buckets, source), `shapes.npy` ((count, 2) int32: each record's latent
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

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from sparse_context_jax.data.builder import Dataset, open_dataset
from sparse_context_jax.data.pipeline import make_pipeline
from sparse_context_jax.encoders.base import Encoders, unit_range
from sparse_context_jax.model.positions import TOKEN_PIXELS
from sparse_context_jax.progress import progress as progress_bar

LATENTS_FILE, INFO_FILE, SHAPES_FILE = "latents.array_record", "latents.json", "shapes.npy"


def load_encoders(spec: str, *, text_len: int | None = None, text_dim: int = 0, pooled_dim: int = 0) -> Encoders:
  """`vae:PATH,text:PATH[,text:PATH]`: the converted Flax VAE at PATH and the converted text encoder(s) (one Qwen3 /
  Mistral folder, T5 and CLIP, or a converted pipeline folder), `text_len` (default 512) tokens per caption;
  `vae:PATH` alone: the hashed stand-in text of text_len (default 32) x text_dim (and a pooled_dim vector when
  > 0), the local mode's; or `module:attribute` naming an `Encoders` or a function returning one."""
  if spec.startswith("vae:"):
    parts = [p.partition(":") for p in spec.split(",")]
    bad = [f"{k}{c}{v}" for k, c, v in parts if k not in ("vae", "text") or not v]
    vae = [v for k, _, v in parts if k == "vae"]
    if bad or len(vae) != 1:
      raise ValueError(f"encoders {spec!r}: expected vae:PATH, then optionally text:PATH (twice for T5 and CLIP)")
    return _vae_encoders(vae[0], [v for k, _, v in parts if k == "text"], text_len=text_len, text_dim=text_dim,
                         pooled_dim=pooled_dim)
  module, _, attr = spec.partition(":")
  if not attr:
    raise ValueError(f"encoders {spec!r}: expected vae:PATH[,text:PATH] or module:attribute")
  try:
    found = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"encoders {spec!r}: cannot import ({e})") from None
  enc = found() if callable(found) and not isinstance(found, Encoders) else found
  if not isinstance(enc, Encoders):
    raise ValueError(f"encoders {spec!r} gave {type(enc).__name__}, expected an Encoders")
  return enc


class _Captions:
  """A prompt encoder at a fixed caption length: the `TextEncoder` precompute runs."""

  def __init__(self, encoder, paths: list[str], length: int):
    self.encoder, self.length = encoder, length
    self.name = "text:" + "+".join(os.path.basename(os.path.abspath(p)) for p in paths) + f"@{length}"
    self.record = {"kind": "text-encoder", "paths": [os.path.abspath(p) for p in paths],
                   "max_sequence_length": length}

  def __call__(self, captions):
    return self.encoder(list(captions), max_sequence_length=self.length)


def _vae_encoders(path: str, text_paths: list[str], *, text_len: int | None, text_dim: int,
                  pooled_dim: int) -> Encoders:
  """The converted VAE at `path` with the converted text encoder(s) at `text_paths`, or the hashed stand-in text
  when there are none; ValueError if a path is not what it should be."""
  from sparse_context_jax.convert import load
  from sparse_context_jax.encoders.vae import VAEImageEncoder, precompute_encoders
  from sparse_context_jax.errors import CheckpointError
  from sparse_context_jax.model.vae import AutoencoderKL
  try:
    vae = load(path)
  except CheckpointError as e:
    raise ValueError(f"encoders vae:{os.fspath(path)}: {e}") from None
  if not isinstance(vae, AutoencoderKL):
    raise ValueError(f"encoders vae:{os.fspath(path)}: a converted {type(vae).__name__}, not a VAE")
  if text_paths:
    from sparse_context_jax.encoders.prompts import load_prompt_encoder
    try:
      text = _Captions(load_prompt_encoder(*text_paths), text_paths, text_len or 512)
    except (CheckpointError, ValueError) as e:
      raise ValueError(f"encoders text:{','.join(text_paths)}: {e}") from None
  else:
    from sparse_context_jax.encoders.hashed_text import HashedText
    text = HashedText(text_len or 32, text_dim, pooled_dim)
  record = {"image": {"kind": "vae", "path": os.path.abspath(path)}, "text": text.record}
  return precompute_encoders(VAEImageEncoder(vae, f"vae:{os.path.basename(os.path.abspath(path))}"), text, record)


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
    info = dict(count=count, encoders=encoders.name, encoder_record=encoders.record, source=os.fspath(dataset.path),
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
