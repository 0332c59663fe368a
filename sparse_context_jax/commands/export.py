"""`export CKPT OUT.safetensors --layout bfl|diffusers`: a converted checkpoint (transformer or VAE), or the weights of
a training run (`export RUN_DIR[/checkpoints/STEP] OUT.safetensors --layout bfl|diffusers [--ema]`), back to one
PyTorch file."""

from __future__ import annotations

from sparse_context_jax.cli import UserError
from sparse_context_jax.convert.output import OutputExistsError
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.convert.streaming import export_checkpoint
from sparse_context_jax.convert.kinds import LAYOUTS


def add_arguments(parser) -> None:
  parser.add_argument("ckpt", metavar="CKPT", help="a directory written by `convert`, or a training run (RUN_DIR: its "
                      "latest step; RUN_DIR/checkpoints/STEP: that step)")
  parser.add_argument("out", metavar="OUT.safetensors", help="the file to write")
  parser.add_argument("--layout", choices=LAYOUTS, required=True, help="tensor names and fusions of the file")
  parser.add_argument("--step", type=int, metavar="N", help="a training run's step N (default: its latest)")
  parser.add_argument("--ema", action="store_true", help="a training run's EMA weights")
  parser.add_argument("--force", action="store_true", help="replace an existing OUT")


def run(args) -> int:
  try:
    export_checkpoint(args.ckpt, args.out, layout=args.layout, force=args.force, step=args.step, ema=args.ema)
  except (CheckpointError, OutputExistsError) as e:
    raise UserError(str(e)) from None
  print(f"wrote {args.out} ({args.layout} layout)")
  return 0
