"""Build a reference-pair dataset (tfds, ArrayRecord shards) from a JSONL manifest or from the synthetic world.

The manifest format is described in `sparse_context_jax.data.manifest` and the README (Data). Every row is
validated first; bad rows are reported with their line numbers and fail the build (nothing is written) unless
`--skip-bad`. The dataset is built in a temporary folder and renamed to OUT at the end.
"""

from __future__ import annotations

import os
import time

from sparse_context_jax.cli import UserError


def add_arguments(parser) -> None:
  parser.add_argument("out", metavar="OUT", help="dataset folder to create (must not exist or be empty)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--manifest", metavar="JSONL", help="manifest: one JSON object per line (see README, Data)")
  source.add_argument("--synthetic", type=int, metavar="COUNT", help="COUNT examples of the synthetic world")
  parser.add_argument("--seed", type=int, default=0, help="synthetic world seed")
  parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"),
                      help="synthetic image size in pixels")
  parser.add_argument("--max-refs", type=int, default=4, help="most references per example (1-4)")
  parser.add_argument("--skip-bad", action="store_true", help="skip bad manifest rows (reported and counted)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args) -> int:
  from sparse_context_jax.data import builder, world
  from sparse_context_jax.data.manifest import MAX_REFS
  if not 1 <= args.max_refs <= MAX_REFS:
    raise UserError(f"--max-refs {args.max_refs} (expected 1 to {MAX_REFS})")
  start = time.perf_counter()
  try:
    if args.manifest is not None:
      path, count, bad = builder.build_from_manifest(args.manifest, args.out, max_refs=args.max_refs,
                                                     skip_bad=args.skip_bad, force=args.force, progress=True)
      for row in bad:
        print(f"skipped {row}")
      what = f"{count} records from {args.manifest}" + (f" ({len(bad)} bad rows skipped)" if bad else "")
    else:
      if args.synthetic <= 0:
        raise UserError(f"--synthetic {args.synthetic} (expected a positive count)")
      records = world.WorldRecords(args.synthetic, args.seed, tuple(args.size), args.max_refs)
      path = builder.write_dataset(records, args.out, max_refs=args.max_refs, metadata=records.metadata(),
                                   force=args.force, progress=True)
      what = f"{args.synthetic} synthetic records (seed {args.seed}, {args.size[0]}x{args.size[1]})"
  except (builder.BadManifest, FileExistsError, FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  print(f"wrote {what} to {os.fspath(path)} in {time.perf_counter() - start:.1f} s")
  return 0
