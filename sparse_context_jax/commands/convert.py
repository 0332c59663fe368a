"""`convert SRC OUT`: a PyTorch FLUX transformer or VAE checkpoint (BFL or diffusers, file or folder), a
transformers text-encoder folder with its tokenizer, or a whole diffusers pipeline folder -> orbax."""

from __future__ import annotations

from sparse_context_jax.cli import UserError, host_only
from sparse_context_jax.convert.output import OutputExistsError
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.convert.pipeline import convert_pipeline, is_pipeline
from sparse_context_jax.convert.streaming import OUTPUT_DTYPES, convert_checkpoint
from sparse_context_jax.model.vae import VAEConfig
from sparse_context_jax.text import CLIPTextConfig, DecoderConfig, T5EncoderConfig


def add_arguments(parser) -> None:
  parser.add_argument("src", metavar="SRC", help="a .safetensors file (BFL or diffusers layout), a diffusers "
                      "folder (config.json + one or index-sharded safetensors files), or a transformers text-encoder "
                      "folder (Qwen3, Mistral, Mistral3, T5 encoder, CLIP text; its tokenizer beside it or in the "
                      "pipeline's sibling tokenizer/ folder), or a diffusers pipeline folder (model_index.json: every "
                      "component the converter knows goes to OUT/<component>)")
  parser.add_argument("out", metavar="OUT", help="new directory: config.json + orbax checkpoint (a pipeline: one "
                      "such folder per component, its tokenizers and scheduler config, pipeline.json)")
  parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32", help="stored parameter dtype")
  parser.add_argument("--config", metavar="CONFIG_JSON", help="diffusers-style config.json of the transformer "
                      "(overrides the folder's; needed only for non-standard sizes in a BFL file)")
  parser.add_argument("--text-layers", type=int, metavar="N", help="keep only the first N layers of a Qwen3 / Mistral "
                      "text encoder, the last hidden state the pipeline reads (FLUX.2 klein: 27, FLUX.2 dev: 30); "
                      "default: every layer")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def _describe(cfg, dtype: str) -> str:
  if isinstance(cfg, DecoderConfig):
    return (f"{cfg.architecture}, hidden {cfg.hidden_size}, {cfg.num_layers} of {cfg.num_hidden_layers} layers, "
            f"tokenizer, {dtype}")
  if isinstance(cfg, (T5EncoderConfig, CLIPTextConfig)):
    return f"{cfg.architecture}, {cfg.num_layers} layers, tokenizer, {dtype}"
  if isinstance(cfg, VAEConfig):
    return f"{cfg.family} VAE, {cfg.latent_channels} latent channels, {dtype}"
  return (f"{cfg.family}, hidden {cfg.hidden_size}, {cfg.depth_double} double + {cfg.depth_single} single blocks, "
          f"{dtype}")


def run(args) -> int:
  host_only()
  try:
    if is_pipeline(args.src):
      if args.config is not None:
        raise CheckpointError(f"--config applies to one checkpoint; {args.src} is a pipeline folder (model_index.json)")
      report = convert_pipeline(args.src, args.out, dtype=args.dtype, force=args.force, text_layers=args.text_layers)
    else:
      cfg = convert_checkpoint(args.src, args.out, dtype=args.dtype, config=args.config, force=args.force,
                               text_layers=args.text_layers)
  except (CheckpointError, OutputExistsError) as e:
    raise UserError(str(e)) from None
  if not is_pipeline(args.src):
    print(f"wrote {args.out}: {_describe(cfg, args.dtype)}")
    return 0
  print(f"wrote {args.out}: {report.pipeline}, {len(report.converted)} component(s) converted")
  for name, cfg in report.converted.items():
    print(f"  {name + '/':<17} {_describe(cfg, args.dtype)}")
  for name in report.copied:
    print(f"  {name + '/':<17} copied")
  for name, why in report.skipped.items():
    print(f"  {name + '/':<17} not converted ({why})")
  return 0
