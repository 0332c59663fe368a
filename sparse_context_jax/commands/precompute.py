"""Turn a dataset into a latent dataset (VAE latents of target and references, text embeddings; ArrayRecord).

It needs real encoders: the Flax VAE and text encoders arrive with a later issue. Until then it runs only with
`--encoders module:attribute` naming an `sparse_context_jax.data.precompute.Encoders` (or a function returning
one) that you provide.
"""

from __future__ import annotations

import os
import time

from sparse_context_jax.cli import UserError


def add_arguments(parser) -> None:
  parser.add_argument("dataset", metavar="DATASET", help="a folder written by build-dataset")
  parser.add_argument("out", metavar="OUT", help="latent folder to create (must not exist or be empty)")
  parser.add_argument("--encoders", metavar="SPEC", help="registered encoder name, or module:attribute giving an "
                      "Encoders (required until the Flax VAE and text encoders land)")
  parser.add_argument("--batch", type=int, default=8, help="examples per encoder call")
  parser.add_argument("--resolution", type=int, default=512, help="bucket area about RESOLUTION^2 (multiple of 16)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args) -> int:
  from sparse_context_jax.data import precompute as P
  if args.encoders is None:
    if not P.REAL_ENCODERS:
      raise UserError("precompute needs real encoders: the Flax VAE and text encoders arrive with a later issue "
                      "and none is available yet (pass --encoders module:attribute to use your own)")
    raise UserError(f"--encoders is required (one of {sorted(P.REAL_ENCODERS)} or module:attribute)")
  if args.batch <= 0:
    raise UserError(f"--batch {args.batch} (expected > 0)")
  if args.resolution <= 0 or args.resolution % 16:
    raise UserError(f"--resolution {args.resolution} (expected a positive multiple of 16)")
  start = time.perf_counter()
  try:
    encoders = P.load_encoders(args.encoders)
    count = P.precompute(args.dataset, args.out, encoders, batch_size=args.batch, resolution=args.resolution,
                         force=args.force)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  print(f"wrote {count} latent records ({encoders.name}) to {os.fspath(args.out)} in "
        f"{time.perf_counter() - start:.1f} s")
  return 0
