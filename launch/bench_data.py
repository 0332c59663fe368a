"""Input-pipeline throughput: examples/s of the grain pipeline with and without worker processes.

  bash launch/python.sh launch/bench_data.py                       # 512x512, 2 references, workers 0 and 2
  bash launch/python.sh launch/bench_data.py --workers 0 4 --batch 16

Builds a synthetic-world dataset (composition, exactly --refs references, masks) in a temporary folder, then reads
it through `make_pipeline` (decode, resize into the bucket, masks, batch) and prints one row per worker count.
The first batch (process start-up, first opens) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_context_jax.data import make_pipeline, world, write_dataset  # noqa: E402


def measure(path, batch: int, size: int, workers: int, threads: int, batches: int) -> tuple[float, float]:
  """(examples per second, seconds to the first batch)."""
  start = time.perf_counter()
  it = iter(make_pipeline(path, batch_size=batch, resolution=size, seed=0, worker_count=workers,
                          num_threads=threads))
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch / (time.perf_counter() - start)
  if hasattr(it, "close"):
    it.close()
  return rate, first


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
  p.add_argument("--refs", type=int, default=2, help="references per example")
  p.add_argument("--records", type=int, default=256, help="records in the benchmark dataset")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=24, help="timed batches per setting")
  p.add_argument("--threads", type=int, default=2, help="reader threads per process")
  p.add_argument("--workers", type=int, nargs="+", default=(0, 2), help="worker process counts to compare")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    records = world.WorldRecords(args.records, seed=0, size=(args.size, args.size), tasks=("composition",),
                                 min_refs=args.refs, max_refs=args.refs)
    path = write_dataset(records, f"{tmp}/bench", max_refs=args.refs, metadata=records.metadata())
    print(f"built {args.records} records ({args.size}x{args.size}, {args.refs} references + masks) in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"\n{'workers':>7} {'threads':>7} {'batch':>5} {'examples/s':>10} {'batches/s':>9} {'first batch s':>13}")
    for workers in args.workers:
      rate, first = measure(path, args.batch, args.size, workers, args.threads, args.batches)
      print(f"{workers:>7} {args.threads:>7} {args.batch:>5} {rate:>10.1f} {rate / args.batch:>9.2f} {first:>13.2f}")


if __name__ == "__main__":
  main()
