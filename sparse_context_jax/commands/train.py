"""Fine-tune with random-ratio reference-token dropping: `train --config configs/FILE.py[:ARG] --workdir DIR
[--config.KEY=VALUE ...]`. Resumes from DIR's latest checkpoint when there is one.

Exit status: 0 when the run reached its last step (or `--steps` more), 75 when a signal (SIGTERM, SIGINT)
stopped it earlier after saving a checkpoint (rerun the same command to resume), 2 on a user error, 130 on a
second Ctrl-C (abort without saving).
"""

from __future__ import annotations

import os
import sys

from sparse_context_jax.cli import EXIT_PREEMPTED, UserError

EXTRA_PREFIX = "--config."   # cli.main passes --config.KEY=VALUE overrides as args.extra ("KEY=VALUE")


def add_arguments(parser) -> None:
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="a get_config(arg) file")
  parser.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, metrics.jsonl, the world data")
  parser.add_argument("--steps", type=int, default=None, help="stop after this many more steps (then save)")
  group = parser.add_argument_group("multi-process (one command per process; every process gets the same flags "
                                    "but --process-id; defaults from SCJ_COORDINATOR, SCJ_NUM_PROCESSES, "
                                    "SCJ_PROCESS_ID)")
  env = os.environ.get
  group.add_argument("--coordinator", metavar="HOST:PORT", default=env("SCJ_COORDINATOR"),
                     help="process 0's address, for jax.distributed")
  group.add_argument("--num-processes", type=int, metavar="N", default=env("SCJ_NUM_PROCESSES"))
  group.add_argument("--process-id", type=int, metavar="I", default=env("SCJ_PROCESS_ID"))
  group.add_argument("--distributed", action="store_true",
                     help="jax.distributed.initialize() from the cluster's environment (TPU pod VMs, SLURM, ...)")
  parser.epilog = "Override any config key with --config.KEY=VALUE (e.g. --config.train.lr=3e-4)."


def initialize_distributed(args) -> None:
  """`jax.distributed.initialize` from the flags, before anything else touches a device."""
  import jax
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit) or args.distributed:
      raise UserError("multi-process: give all of --coordinator, --num-processes and --process-id (or only "
                      "--distributed to detect them)")
    if not 0 <= args.process_id < args.num_processes:
      raise UserError(f"--process-id {args.process_id} is not in [0, --num-processes {args.num_processes})")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def run(args) -> int:
  import jax

  import sparse_context_jax.compile_cache as compile_cache
  compile_cache.enable()

  from sparse_context_jax.errors import CheckpointError
  from sparse_context_jax.train.config import ConfigError, apply_overrides, load, validate
  try:
    config = apply_overrides(load(args.config), args.extra)
  except ConfigError as e:
    raise UserError(str(e)) from None
  initialize_distributed(args)
  try:
    validate(config, jax.device_count(), jax.process_count())
  except ConfigError as e:
    raise UserError(str(e)) from None
  from sparse_context_jax.train.loop import Outcome, train
  outcome = Outcome()
  try:
    train(config, args.workdir, stop_after=args.steps, outcome=outcome)
  except (CheckpointError, ConfigError) as e:
    raise UserError(str(e)) from None
  if outcome.preempted:
    if jax.process_index() == 0:
      print(f"preempted at step {outcome.step}, saved; rerun the same command to resume", file=sys.stderr)
    return EXIT_PREEMPTED
  if jax.process_index() == 0:
    print(f"step {outcome.step}; metrics in {args.workdir}/metrics.jsonl")
  return 0
