"""Run checkpoints (orbax, async): the train state (params, optimizer, EMA, RNG, step), the data iterator's state
and the config, saved together per step; keep-N; resume from the latest.

A checkpoint that exists but cannot be read is an error (`CheckpointError`), never a silent fresh start.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

# The layout a run reader (convert/run.py) reads: <workdir>/checkpoints/<step>/{state, data, meta}.
from sparse_context_jax.convert.run import CHECKPOINTS
# The project's one checkpoint error (also raised by `load_model` when a run starts from a converted checkpoint).
from sparse_context_jax.errors import CheckpointError  # noqa: F401


class RunCheckpoints:
  """`<workdir>/checkpoints/<step>/{state, data, meta}`; meta holds the step, the config and the run's counters
  (what accumulates over steps, e.g. the keep-ratio histogram)."""

  def __init__(self, workdir: str | os.PathLike, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict, config_json: str, force: bool = False,
           counters: dict | None = None) -> None:
    """Starts an asynchronous save (the arrays are copied before it returns; training goes on)."""
    meta = {"step": step, "config": json.loads(config_json), "counters": counters or {}}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=force)

  def meta(self, step: int) -> dict:
    """The meta record of `step` alone (step, config, counters): read before the state, to check a resume."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - as in `restore`
      raise CheckpointError(f"cannot read the record of step {step} in {self.directory}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict, dict]:
    """(state in the shardings of `abstract_state`, data iterator state, meta) of `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    try:
      got = self.manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; every one of them is fatal here
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''} (remove the step folder to fall back to "
                            "an earlier one, or use a new --workdir)") from e
    return got["state"], got["data"], got["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
