"""`python -m sparse_context_jax <command>`: the command-line entry point.

Each command is a module with `add_arguments(parser)` and `run(args) -> int`. A `UserError` (bad value, bad path)
ends the command with one line on stderr and exit status 2; anything else is a bug and keeps its traceback.

Exit statuses, every command: 0 success; 1 some work items failed and were reported (generate's bad jobs); 2 a user
error (one line on stderr, nothing half-written); 75 (sysexits' EX_TEMPFAIL) a run stopped by a signal after saving
(train: rerun the same command to resume); 3 a plan that does not fit (plan); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "build-dataset": ("sparse_context_jax.commands.build_dataset",
                      "a reference-pair dataset (ArrayRecord) from a JSONL manifest or the synthetic world"),
    "convert": ("sparse_context_jax.commands.convert", "a PyTorch FLUX checkpoint (BFL or diffusers) to orbax"),
    "demo": ("sparse_context_jax.commands.demo",
             "presets, then a small model trained on the synthetic world generating dense and sparse"),
    "encode-prompts": ("sparse_context_jax.commands.encode_prompts",
                       "text prompts (a list or generate's jobs) -> .npz embeddings, reusable across runs"),
    "export": ("sparse_context_jax.commands.export",
               "a converted checkpoint or a training run (LoRA: merged, or alone) to one .safetensors file"),
    "generate": ("sparse_context_jax.commands.generate",
                 "batch generation with sparse references: JSONL jobs -> PNGs and a JSON report"),
    "plan": ("sparse_context_jax.commands.plan",
             "compile the train step for a TPU topology ahead of time: memory per chip, FLOPs, step time, fits?"),
    "precompute": ("sparse_context_jax.commands.precompute",
                   "a dataset to VAE latents and text embeddings (ArrayRecord), through pluggable encoders"),
    "presets": ("sparse_context_jax.commands.presets", "the released FLUX architectures: sizes and parameter counts"),
    "train": ("sparse_context_jax.commands.train",
              "fine-tune with random-ratio reference-token dropping (sharded, resumable)"),
}


EXIT_PREEMPTED = 75


class UserError(Exception):
  """An error the user can fix (bad argument, missing file): reported as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
  """argparse, with a usage error reported like every other user error: one line, exit status 2."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def host_only() -> None:
  """For commands that only move weights between files (convert, export): jax uses the CPU alone, so the command
  never starts an accelerator's runtime (seconds of start-up, a GPU's preallocated memory, or the TPU chips that a
  training job on the same host holds)."""
  import jax
  jax.config.update("jax_platforms", "cpu")


def main(argv: list[str] | None = None) -> int:
  # transformers (tokenizers only) advises on import that PyTorch is missing: expected, torch is never a dependency.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  parser = _Parser(prog="sparse_context_jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(module=module)
    importlib.import_module(module).add_arguments(p)
  try:
    args, extra = parser.parse_known_args(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # A command may take a family of options argparse cannot declare (train: --config.KEY=VALUE overrides): it
  # names their prefix in EXTRA_PREFIX and receives them, prefix removed, as args.extra.
  prefix = getattr(importlib.import_module(args.module), "EXTRA_PREFIX", None)
  unknown = [a for a in extra if not (prefix and a.startswith(prefix))]
  if unknown:
    print(f"error: {parser.prog} {args.command}: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
    return 2
  args.extra = [a[len(prefix):] for a in extra] if prefix else []
  try:
    return importlib.import_module(args.module).run(args) or 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
