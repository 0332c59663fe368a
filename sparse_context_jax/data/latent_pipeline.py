"""The grain pipeline over a latent folder (`precompute`'s output): fixed-shape batches of latent records.

```python
it = iter(make_latent_pipeline(path, batch_size=8, seed=0, max_refs=2))
batch = next(it)        # dict of numpy arrays, see `LatentLoader`
state = it.get_state()  # as `make_pipeline`'s: a batch position
```
The same plan as the pixel pipeline (`pipeline.bucketed_batches`: per-epoch seeded shuffle within buckets, padding
with `valid = False`, each process its rows of one global batch sequence), where a bucket is one latent shape:
records were bucketed (resized into an aspect bucket) when they were encoded, so equal shapes batch together.
"""

from __future__ import annotations

import functools
import os

import grain
import numpy as np

from sparse_context_jax.data.pipeline import bucketed_batches
from sparse_context_jax.data.precompute import Latents


def describe(path: str | os.PathLike | Latents) -> dict:
  """What a model needs to match in a latent folder (a path, or one already open), from its first record:
  `latent_channels` (C of (h, w, C)), `ref_slots` (R), `text` {name: shape of one example's `text_<name>` array}.
  FileNotFoundError if `path` is not a latent folder, ValueError if it has no records."""
  latents = path if isinstance(path, Latents) else Latents(path)
  if len(latents) == 0:
    raise ValueError(f"latent folder {os.fspath(latents.path)!r} has no records")
  latents.shapes   # noqa: B018 -- refuse a folder without its shape index now, not in the pipeline
  first = latents[0]
  return dict(latent_channels=int(first["target_latent"].shape[-1]), ref_slots=int(first["ref_valid"].shape[0]),
              text={k[len("text_"):]: tuple(v.shape) for k, v in first.items() if k.startswith("text_")})


class LatentLoader:
  """(record position, bucket, valid) -> one example, every latent of the bucket's shape (h, w):

  - `target_latent` (h, w, C); `reference_latents` (R, h, w, C) with R = max_refs, unused slots zero;
    `ref_valid` (R,) bool;
  - `text_<name>` arrays, one shape across the dataset (that of the first record; ValueError otherwise);
  - `caption` str; `task` int32; `index` int64 (the source dataset's record); `valid` bool (False on padding).
  Holds only a path, so worker processes can unpickle it.
  """

  def __init__(self, path: str, max_refs: int, text: dict):
    self.path, self.max_refs, self.text = path, max_refs, dict(text)

  @functools.cached_property
  def latents(self) -> Latents:
    return Latents(self.path)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "latents"}

  def __call__(self, item: tuple[int, int, bool]) -> dict:
    position, _, valid = item
    rec = self.latents[position]
    refs, ref_valid = rec["reference_latents"], rec["ref_valid"]
    if len(refs) > self.max_refs:
      raise ValueError(f"latent record {position} of {self.path!r} has {len(refs)} reference slots, more than "
                       f"max_refs={self.max_refs}")
    out_refs = np.zeros((self.max_refs, *refs.shape[1:]), refs.dtype)
    out_valid = np.zeros(self.max_refs, bool)
    out_refs[:len(refs)], out_valid[:len(refs)] = refs, ref_valid
    text = {}
    for name, shape in self.text.items():
      got = rec.get(f"text_{name}")
      if got is None or got.shape != shape:
        raise ValueError(f"latent record {position} of {self.path!r}: text_{name} of shape "
                         f"{None if got is None else got.shape}, expected {shape} like the first record (text "
                         "arrays need one fixed length across the dataset: pad them in the text encoder)")
      text[f"text_{name}"] = got
    return dict(target_latent=rec["target_latent"], reference_latents=out_refs,
                ref_valid=out_valid, **text, caption=np.asarray(str(rec["caption"])),
                task=np.int32(rec["task"]), index=np.int64(rec["index"]), valid=np.bool_(valid))


def make_latent_pipeline(path: str | os.PathLike, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                         num_epochs: int | None = None, shard: grain.sharding.ShardOptions | None = None,
                         max_refs: int | None = None, worker_count: int = 0, num_threads: int = 8,
                         prefetch: int = 16) -> grain.IterDataset:
  """A grain `IterDataset` of batches of `LatentLoader` examples (arguments as `make_pipeline`'s; max_refs
  defaults to the folder's reference slots)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size {batch_size} (expected > 0)")
  latents = Latents(path)   # opened once: its first record describes it, its shape index buckets it
  info = describe(latents)
  _, bucket_of = np.unique(latents.shapes, axis=0, return_inverse=True)
  loader = LatentLoader(os.fspath(path), max_refs or info["ref_slots"], info["text"])
  return bucketed_batches(bucket_of.reshape(-1), loader, batch_size=batch_size, seed=seed, shuffle=shuffle,
                          num_epochs=num_epochs, shard=shard, worker_count=worker_count, num_threads=num_threads,
                          prefetch=prefetch)
