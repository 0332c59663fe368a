"""Fine-tune with random-ratio reference-token dropping: `train --config configs/FILE.py[:ARG] --workdir DIR
[--config.KEY=VALUE ...]`. Resumes from DIR's latest checkpoint when there is one."""

from __future__ import annotations

from sparse_context_jax.cli import UserError

EXTRA_PREFIX = "--config."   # cli.main passes --config.KEY=VALUE overrides as args.extra ("KEY=VALUE")


def add_arguments(parser) -> None:
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="a get_config(arg) file")
  parser.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, metrics.jsonl, the world data")
  parser.add_argument("--steps", type=int, default=None, help="stop after this many more steps (then save)")
  parser.epilog = "Override any config key with --config.KEY=VALUE (e.g. --config.train.lr=3e-4)."


def run(args) -> int:
  import jax

  from sparse_context_jax.train import config as C
  from sparse_context_jax.train.checkpoint import CheckpointError
  try:
    config = C.apply_overrides(C.load(args.config), args.extra)
    C.validate(config, jax.device_count())
  except C.ConfigError as e:
    raise UserError(str(e)) from None
  from sparse_context_jax.train.loop import train
  try:
    state = train(config, args.workdir, stop_after=args.steps)
  except CheckpointError as e:
    raise UserError(str(e)) from None
  print(f"step {int(jax.device_get(state['step']))}; metrics in {args.workdir}/metrics.jsonl")
  return 0
