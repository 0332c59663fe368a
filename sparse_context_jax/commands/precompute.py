"""Turn a dataset into a latent dataset (VAE latents of target and references, text embeddings; ArrayRecord).

`--encoders vae:PATH,text:PATH` encodes images with the project's Flax VAE and captions with its text encoder(s)
(folders written by `convert`; `text:` twice for FLUX.1's T5 and CLIP, or once for a converted pipeline folder),
`--text-len` tokens per caption (default 512, as the pipelines encode prompts). `--encoders vae:PATH` alone is the
local mode: its captions get the hashed stand-in embedding (`--text-len` (default 32) x `--text-dim`, the model's
context_dim, and `--pooled-dim` for FLUX.1), not a text encoder's. `--encoders module:attribute` names your own
`sparse_context_jax.encoders.Encoders` (or a function returning one).
"""

from __future__ import annotations

import os
import sys
import time

from sparse_context_jax.cli import UserError
from sparse_context_jax.model.positions import TOKEN_PIXELS


def add_arguments(parser) -> None:
  parser.add_argument("dataset", metavar="DATASET", help="a folder written by build-dataset")
  parser.add_argument("out", metavar="OUT", help="latent folder to create (must not exist or be empty)")
  parser.add_argument("--encoders", metavar="SPEC", help="vae:PATH,text:PATH[,text:PATH] (converted Flax VAE and "
                      "text encoders), vae:PATH alone (the hashed stand-in text), or module:attribute giving an "
                      "Encoders")
  parser.add_argument("--text-len", type=int, help="text tokens per caption (default 512 with text:PATH, 32 for the "
                      "stand-in)")
  parser.add_argument("--text-dim", type=int, default=0, help="vae:PATH: stand-in text features, the model's "
                      "context_dim (required with vae:PATH)")
  parser.add_argument("--pooled-dim", type=int, default=0, help="vae:PATH: pooled text vector size, the model's "
                      "pooled_dim (768 for FLUX.1, 0 for FLUX.2)")
  parser.add_argument("--batch", type=int, default=8, help="examples per encoder call")
  parser.add_argument("--resolution", type=int, default=512, help="bucket area about RESOLUTION^2 (multiple of 16)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args) -> int:
  from sparse_context_jax.data import open_dataset
  from sparse_context_jax.data.precompute import load_encoders, precompute
  if args.encoders is None:
    raise UserError("precompute needs --encoders: vae:PATH,text:PATH (converted VAE and text encoder), vae:PATH "
                    "(captions get the hashed stand-in text) or module:attribute")
  if args.text_len is not None and args.text_len <= 0:
    raise UserError(f"--text-len {args.text_len} (expected > 0)")
  if args.batch <= 0:
    raise UserError(f"--batch {args.batch} (expected > 0)")
  if args.resolution <= 0 or args.resolution % TOKEN_PIXELS:
    raise UserError(f"--resolution {args.resolution} (expected a positive multiple of {TOKEN_PIXELS})")
  start = time.perf_counter()
  try:
    dataset = open_dataset(args.dataset)   # before the encoders: a wrong folder is found at once
    encoders = load_encoders(args.encoders, text_len=args.text_len, text_dim=args.text_dim,
                               pooled_dim=args.pooled_dim)
    count = precompute(dataset, args.out, encoders, batch_size=args.batch, resolution=args.resolution,
                         force=args.force, progress=True)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  if "text:" not in args.encoders and args.encoders.startswith("vae:"):
    print("note: captions were embedded with the hashed stand-in (local mode), not a text encoder; give "
          "text:PATH for real text embeddings", file=sys.stderr)
  print(f"wrote {count} latent records ({encoders.name}) to {os.fspath(args.out)} in "
        f"{time.perf_counter() - start:.1f} s")
  return 0
