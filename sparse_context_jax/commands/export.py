"""`export CKPT OUT.safetensors --layout bfl|diffusers`: a converted checkpoint (transformer or VAE), or the weights of
a training run (`export RUN_DIR[/checkpoints/STEP] OUT.safetensors --layout bfl|diffusers [--ema]`, a LoRA run's
LoRA merged into its base), back to one PyTorch file; `export RUN_DIR OUT.safetensors --lora [--layout
diffusers|bfl]`: a LoRA run's LoRA alone (`convert.lora_out.export_lora`, diffusers layout unless --layout)."""

from __future__ import annotations

from sparse_context_jax.cli import UserError, host_only
from sparse_context_jax.convert.output import OutputExistsError, check_destination
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.convert.streaming import export_checkpoint
from sparse_context_jax.convert.kinds import LAYOUTS


def add_arguments(parser) -> None:
  parser.add_argument("ckpt", metavar="CKPT", help="a directory written by `convert`, or a training run (RUN_DIR: its "
                      "latest step; RUN_DIR/checkpoints/STEP: that step)")
  parser.add_argument("out", metavar="OUT.safetensors", help="the file to write")
  parser.add_argument("--layout", choices=LAYOUTS, help="tensor names and fusions of the file (required, except "
                      "with --lora: diffusers by default)")
  parser.add_argument("--lora", action="store_true", help="a LoRA training run's LoRA alone (rank and alpha in the "
                      "file's metadata), not the merged model")
  parser.add_argument("--step", type=int, metavar="N", help="a training run's step N (default: its latest)")
  parser.add_argument("--ema", action="store_true", help="a training run's EMA weights (a LoRA run's: the EMA of "
                      "its LoRA)")
  parser.add_argument("--force", action="store_true", help="replace an existing OUT")


def run(args) -> int:
  host_only()
  if args.layout is None and not args.lora:
    raise UserError("export: --layout bfl|diffusers is required (it may be left out only with --lora)")
  try:
    if args.lora:
      layout = args.layout or "diffusers"
      _export_lora(args.ckpt, args.out, layout=layout, force=args.force, step=args.step, ema=args.ema)
      print(f"wrote {args.out} (LoRA, {layout} layout)")
      return 0
    export_checkpoint(args.ckpt, args.out, layout=args.layout, force=args.force, step=args.step, ema=args.ema)
  except (CheckpointError, OutputExistsError) as e:
    raise UserError(str(e)) from None
  print(f"wrote {args.out} ({args.layout} layout)")
  return 0


def _export_lora(ckpt, out, *, layout: str, force: bool, step: int | None, ema: bool) -> None:
  """The LoRA factors of a LoRA run's step (their EMA with `ema`) to one safetensors file in `layout`."""
  from sparse_context_jax.convert.run import is_run, open_run, read_lora
  from sparse_context_jax.convert.lora_out import export_lora
  check_destination(out, force)
  if not is_run(ckpt):
    raise CheckpointError(f"{ckpt} is not a training run: --lora exports the LoRA a training run trained (drop "
                          "--lora to export a converted checkpoint's full model)")
  run = open_run(ckpt, step=step, ema=ema)
  if not run.lora:
    raise CheckpointError(f"{run.description} trained no LoRA (its config.lora.rank is "
                          f"{run.config.get('lora', {}).get('rank', 0)}): drop --lora to export its full model")
  try:
    export_lora(read_lora(run), run.lora_config, run.model, out, layout)
  except ValueError as e:   # a LoRA module the layout has no name for
    raise CheckpointError(f"{run.description}: {e}") from None
