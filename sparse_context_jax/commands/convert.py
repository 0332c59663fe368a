"""`convert SRC OUT`: a PyTorch FLUX transformer or VAE checkpoint (BFL or diffusers, file or folder), or a
transformers text-encoder folder with its tokenizer -> orbax."""

from __future__ import annotations

from sparse_context_jax.cli import UserError
from sparse_context_jax.convert.output import OutputExistsError
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.convert.streaming import OUTPUT_DTYPES, convert_checkpoint
from sparse_context_jax.model.vae import VAEConfig
from sparse_context_jax.text import CLIPTextConfig, DecoderConfig, T5EncoderConfig


def add_arguments(parser) -> None:
  parser.add_argument("src", metavar="SRC", help="a .safetensors file (BFL or diffusers layout), a diffusers "
                      "folder (config.json + one or index-sharded safetensors files), or a transformers text-encoder "
                      "folder (Qwen3, Mistral, Mistral3, T5 encoder, CLIP text; its tokenizer beside it or in the "
                      "pipeline's sibling tokenizer/ folder)")
  parser.add_argument("out", metavar="OUT", help="new directory: config.json + orbax checkpoint")
  parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32", help="stored parameter dtype")
  parser.add_argument("--config", metavar="CONFIG_JSON", help="diffusers-style config.json of the transformer "
                      "(overrides the folder's; needed only for non-standard sizes in a BFL file)")
  parser.add_argument("--text-layers", type=int, metavar="N", help="keep only the first N layers of a Qwen3 / Mistral "
                      "text encoder, the last hidden state the pipeline reads (FLUX.2 klein: 27, FLUX.2 dev: 30); "
                      "default: every layer")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args) -> int:
  try:
    cfg = convert_checkpoint(args.src, args.out, dtype=args.dtype, config=args.config, force=args.force,
                             text_layers=args.text_layers)
  except (CheckpointError, OutputExistsError) as e:
    raise UserError(str(e)) from None
  if isinstance(cfg, DecoderConfig):
    print(f"wrote {args.out}: {cfg.architecture}, hidden {cfg.hidden_size}, {cfg.num_layers} of "
          f"{cfg.num_hidden_layers} layers, tokenizer, {args.dtype}")
  elif isinstance(cfg, (T5EncoderConfig, CLIPTextConfig)):
    print(f"wrote {args.out}: {cfg.architecture}, {cfg.num_layers} layers, tokenizer, {args.dtype}")
  elif isinstance(cfg, VAEConfig):
    print(f"wrote {args.out}: {cfg.family} VAE, {cfg.latent_channels} latent channels, {args.dtype}")
  else:
    print(f"wrote {args.out}: {cfg.family}, hidden {cfg.hidden_size}, {cfg.depth_double} double + "
          f"{cfg.depth_single} single blocks, {args.dtype}")
  return 0
