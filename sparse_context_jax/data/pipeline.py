"""The grain input pipeline: fixed-shape, aspect-bucketed batches of decoded reference pairs, checkpointable.

```python
it = iter(make_pipeline(open_dataset(path), batch_size=8, resolution=512, seed=0,
                        shard=grain.sharding.ShardOptions(jax.process_index(), jax.process_count())))
batch = next(it)        # dict of numpy arrays, see `Loader`
state = it.get_state()  # JSON-able; a fresh iterator given it with set_state yields the identical next batch
```
How it stays deterministic and random-access: a `BatchPlan` lists, for each step, which records form the batch.
Per epoch (seeded by (seed, epoch)) it shuffles this process's records within each aspect bucket, cuts each
bucket into batches, pads the last batch of a bucket by repeating records with `valid = False`, and shuffles the
batch order. So every record of the shard is a valid example exactly once per epoch, a batch has one shape, and
the pipeline is a grain `MapDataset` (plan -> load -> batch) whose iterator state is just a position.

Sharding: every process reads its rows of one global batch sequence. The plan is made for the global batch
(`batch_size * shard_count` examples over every record), and process `shard_index` takes rows
`[shard_index * batch_size, (shard_index + 1) * batch_size)` of each global batch. So the data a run sees (order,
buckets, padding) does not depend on how many processes read it: 2 processes of batch 4 together give exactly
the batches of 1 process of batch 8, every record is a valid example once per epoch across the processes, and all
processes step through the same number of batches (one bucket, one shape, per global batch). The iterator state is
a position in batches, equal on every process and valid for any process count.
"""

from __future__ import annotations

import functools
import os
import sys

import grain
import numpy as np

from sparse_context_jax.data.buckets import aspect_buckets, nearest_bucket
from sparse_context_jax.data.builder import Dataset, open_dataset
from sparse_context_jax.images import resize_crop
from sparse_context_jax.model.positions import TOKEN_PIXELS

# An "infinite" repeat: a length grain can index without overflow, far beyond any training run.
_FOREVER = 1 << 40


class BatchPlan:
  """Random access from a flat example position to (record index, bucket, valid) for one shard.

  Position p is example p % batch_size of batch p // batch_size; batches of epoch e fill positions
  [e * per_epoch, (e + 1) * per_epoch) * batch_size.
  """

  def __init__(self, indices: np.ndarray, bucket_of: np.ndarray, batch_size: int, seed: int, shuffle: bool,
               num_epochs: int | None):
    self.indices, self.bucket_of = np.asarray(indices, np.int64), np.asarray(bucket_of, np.int64)
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    counts = np.bincount(self.bucket_of, minlength=1)
    self.batches_per_epoch = int(sum(-(-c // batch_size) for c in counts))
    self.num_epochs = num_epochs

  def __len__(self) -> int:
    epochs = _FOREVER // max(1, self.batches_per_epoch * self.batch_size) if self.num_epochs is None \
        else self.num_epochs
    return epochs * self.batches_per_epoch * self.batch_size

  @functools.lru_cache(maxsize=2)
  def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(records, buckets, valid), each (batches_per_epoch * batch_size,), for epoch e."""
    rng = np.random.default_rng([self.seed, e])
    records, buckets, valid = [], [], []
    for b in np.unique(self.bucket_of):
      members = self.indices[self.bucket_of == b]
      if self.shuffle:
        members = rng.permutation(members)
      pad = -len(members) % self.batch_size
      records.append(np.concatenate([members, np.resize(members, pad)]))
      buckets.append(np.full(len(members) + pad, b))
      valid.append(np.arange(len(members) + pad) < len(members))
    order = np.arange(self.batches_per_epoch)
    if self.shuffle:
      order = rng.permutation(order)
    pick = lambda parts: np.concatenate(parts).reshape(-1, self.batch_size)[order].reshape(-1)
    return pick(records), pick(buckets), pick(valid)

  def __getitem__(self, position: int) -> tuple[int, int, bool]:
    per_epoch = self.batches_per_epoch * self.batch_size
    records, buckets, valid = self.epoch(position // per_epoch)
    j = position % per_epoch
    return int(records[j]), int(buckets[j]), bool(valid[j])


class ProcessRows:
  """The rows of one process in a global `BatchPlan`: local position q (batch q // rows, row q % rows) -> the
  plan's entry at row `index * rows + q % rows` of global batch q // rows."""

  def __init__(self, plan: BatchPlan, index: int, count: int):
    if plan.batch_size % count:
      raise ValueError(f"global batch {plan.batch_size} is not divisible by {count} processes")
    self.plan, self.index, self.count, self.rows = plan, index, count, plan.batch_size // count

  def __len__(self) -> int:
    return len(self.plan) // self.count

  def __getitem__(self, position: int) -> tuple[int, int, bool]:
    batch, row = divmod(position, self.rows)
    return self.plan[batch * self.plan.batch_size + self.index * self.rows + row]


class Loader:
  """(record index, bucket, valid) -> one example, every image in the bucket's shape (H, W):

  - `target` (H, W, 3) uint8; `references` (R, H, W, 3) uint8 with R = max_refs, unused slots zero;
    `ref_valid` (R,) bool; `masks` (R, H, W) uint8 resized with their references; `mask_valid` (R,) bool.
  - `caption` str; `task` int32 (index into TASKS); `index` int64 (record); `valid` bool (False on padding).
  A module-level class holding only a path, so worker processes can unpickle it; each process opens the data
  source on first use.
  """

  def __init__(self, path: str, buckets, max_refs: int):
    self.path, self.buckets, self.max_refs = path, tuple(buckets), max_refs

  @functools.cached_property
  def source(self):
    return open_dataset(self.path).source()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "source"}

  def __call__(self, item: tuple[int, int, bool]) -> dict:
    index, bucket, valid = item
    rec = self.source[index]
    if int(rec["index"]) != index:   # the metadata sizes are only valid if record order is index order
      raise RuntimeError(f"record {index} of {self.path!r} holds index {int(rec['index'])}: dataset corrupted")
    hw, R = self.buckets[bucket], self.max_refs
    refs, masks = rec["references"], rec["masks"]
    out_refs = np.zeros((R, *hw, 3), np.uint8)
    out_masks = np.zeros((R, *hw), np.uint8)
    for i, ref in enumerate(refs):
      out_refs[i] = resize_crop(ref, hw)
    for i, mask in enumerate(masks):
      out_masks[i] = resize_crop(mask[..., 0], hw)
    return dict(target=resize_crop(rec["target"], hw), references=out_refs, ref_valid=np.arange(R) < len(refs),
                masks=out_masks, mask_valid=np.arange(R) < len(masks),
                caption=np.asarray(rec["caption"].decode("utf-8")), task=np.int32(rec["task"]),
                index=np.int64(index), valid=np.bool_(valid))


def _parse_absl_flags() -> None:
  """grain's worker processes read absl flags; parse them (empty) when the host program has not."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def make_pipeline(dataset: Dataset | str | os.PathLike, *, batch_size: int, resolution: int = 512, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None,
                  shard: grain.sharding.ShardOptions | None = None, buckets=None, max_refs: int | None = None,
                  worker_count: int = 0, num_threads: int = 8, prefetch: int = 16) -> grain.IterDataset:
  """A grain `IterDataset` of batches (every leaf of `Loader`'s example with a leading batch_size axis).

  resolution: bucket area is about resolution^2 (ignored if `buckets` gives explicit (H, W) pairs, multiples of
  16). num_epochs None repeats forever. shard: this process's `ShardOptions` (default: one process): its rows of
  the global batches of `batch_size * shard_count` examples (see the module docstring); `batch_size` is this
  process's share.
  worker_count > 0 decodes in that many worker processes (call from a `__main__`-guarded script); num_threads
  and prefetch are per process. max_refs: reference slots per example (default: the dataset's maximum).
  """
  dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
  if batch_size <= 0:
    raise ValueError(f"batch_size {batch_size} (expected > 0)")
  buckets = tuple(tuple(b) for b in buckets) if buckets is not None else aspect_buckets(resolution)
  if any(h % TOKEN_PIXELS or w % TOKEN_PIXELS or h <= 0 or w <= 0 for h, w in buckets):
    raise ValueError(f"buckets {buckets} (expected (height, width) pairs of positive multiples of 16)")
  max_refs = max_refs or int(dataset.metadata["max_refs"])
  if len(dataset) == 0:
    raise ValueError(f"dataset {dataset.path} has no records")
  sizes = dataset.target_sizes
  bucket_of = np.array([nearest_bucket(sizes[i], buckets) for i in range(len(dataset))])
  return bucketed_batches(bucket_of, Loader(str(dataset.path), buckets, max_refs), batch_size=batch_size, seed=seed,
                          shuffle=shuffle, num_epochs=num_epochs, shard=shard, worker_count=worker_count,
                          num_threads=num_threads, prefetch=prefetch)


def bucketed_batches(bucket_of: np.ndarray, loader, *, batch_size: int, seed: int, shuffle: bool,
                     num_epochs: int | None, shard: grain.sharding.ShardOptions | None, worker_count: int = 0,
                     num_threads: int = 8, prefetch: int = 16) -> grain.IterDataset:
  """Records 0..len(bucket_of)-1, record i in bucket `bucket_of[i]` -> a grain `IterDataset` of this process's
  batches of `loader((record, bucket, valid))` examples (the `BatchPlan` / `ProcessRows` semantics of the module
  docstring; shared by the pixel and the latent pipelines)."""
  shard = shard or grain.sharding.NoSharding()
  if not 0 <= shard.shard_index < shard.shard_count:
    raise ValueError(f"shard {shard.shard_index} of {shard.shard_count} (expected 0 <= index < count)")
  plan = BatchPlan(np.arange(len(bucket_of)), bucket_of, batch_size * shard.shard_count, seed, shuffle, num_epochs)
  rows = ProcessRows(plan, shard.shard_index, shard.shard_count)
  ds = grain.MapDataset.source(rows).map(loader).batch(batch_size)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    _parse_absl_flags()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2))
  return it
