"""`convert SRC OUT`: a PyTorch FLUX transformer or VAE checkpoint (BFL or diffusers, file or folder) -> orbax."""

from __future__ import annotations

from sparse_context_jax.cli import UserError
from sparse_context_jax.convert.output import OutputExistsError
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.convert.streaming import OUTPUT_DTYPES, convert_checkpoint
from sparse_context_jax.model.vae import VAEConfig


def add_arguments(parser) -> None:
  parser.add_argument("src", metavar="SRC", help="a .safetensors file (BFL or diffusers layout) or a diffusers "
                      "folder (config.json + one or index-sharded safetensors files)")
  parser.add_argument("out", metavar="OUT", help="new directory: config.json + orbax checkpoint")
  parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32", help="stored parameter dtype")
  parser.add_argument("--config", metavar="CONFIG_JSON", help="diffusers-style config.json of the transformer "
                      "(overrides the folder's; needed only for non-standard sizes in a BFL file)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args) -> int:
  try:
    cfg = convert_checkpoint(args.src, args.out, dtype=args.dtype, config=args.config, force=args.force)
  except (CheckpointError, OutputExistsError) as e:
    raise UserError(str(e)) from None
  if isinstance(cfg, VAEConfig):
    print(f"wrote {args.out}: {cfg.family} VAE, {cfg.latent_channels} latent channels, {args.dtype}")
  else:
    print(f"wrote {args.out}: {cfg.family}, hidden {cfg.hidden_size}, {cfg.depth_double} double + "
          f"{cfg.depth_single} single blocks, {args.dtype}")
  return 0
