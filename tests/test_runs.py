"""From a training run to weights: the run reader (convert/run.py), `load_model(RUN_DIR)`, `export RUN_DIR` and
`generate --model RUN_DIR` on a tiny local-mode run (stand-in pixel tokens and hashed text)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sparse_context_jax import cli
from sparse_context_jax.convert import CheckpointError, load_model
from sparse_context_jax.convert.run import open_run, read_run
from sparse_context_jax.train import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# One keep-ratio rung (one compiled train step), EMA on, a checkpoint at steps 2 and 4.
RUN = ["objective.keep_low=0.25", "objective.keep_high=0.25", "objective.dense_prob=0.0", "log.progress=False",
       "data.world.count=16", "train.warmup_steps=1", "train.steps=4", "checkpoint.every=2", "train.ema_decay=0.9"]


def leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bitwise(got, want) -> None:
  got, want = leaves(got), leaves(want)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step tiny run with EMA, saved at steps 2 and 4: (run dir, its config, the final train state)."""
  from sparse_context_jax.train.loop import train
  workdir = str(tmp_path_factory.mktemp("runs") / "run")
  config = C.apply_overrides(C.load(TINY), RUN)
  return workdir, config, jax.device_get(train(config, workdir))


def saved_state(workdir: str, config, step: int) -> dict:
  """The whole train state of `step` as training itself restores it (the reference for the run reader)."""
  from sparse_context_jax.parallel import make_mesh
  from sparse_context_jax.train.checkpoint import RunCheckpoints
  from sparse_context_jax.train.state import setup
  static = setup(config, C.model_config(config), make_mesh(config.mesh, jax.devices()))
  ckpt = RunCheckpoints(workdir, keep=10)
  try:
    return jax.device_get(ckpt.restore(step, static.abstract)[0])
  finally:
    ckpt.close()


def test_read_run_gives_the_weights_of_the_chosen_step_and_ema(run):
  workdir, config, final = run
  latest = read_run(workdir)
  assert latest.step == 4 and latest.info.steps == (2, 4) and latest.model == C.model_config(config)
  assert latest.config["train"]["steps"] == 4
  assert_bitwise(latest.params, final["params"])
  assert_bitwise(read_run(workdir, ema=True).params, final["ema"])
  at2 = saved_state(workdir, config, 2)
  assert_bitwise(read_run(workdir, step=2).params, at2["params"])
  assert_bitwise(read_run(os.path.join(workdir, "checkpoints", "2"), ema=True).params, at2["ema"])
  # The EMA differs from the parameters, and step 2 from step 4: each selection picks other weights.
  kernel = lambda tree: leaves(tree)["['img_in']['kernel']"]
  assert not np.array_equal(kernel(final["ema"]), kernel(final["params"]))
  assert not np.array_equal(kernel(at2["params"]), kernel(final["params"]))

  from flax import nnx
  model = load_model(workdir, step=2, ema=True)
  assert_bitwise(nnx.state(model, nnx.Param).to_pure_dict(), at2["ema"])


def test_bad_run_dirs_are_one_line_errors(run, tmp_path):
  workdir = run[0]
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  cases = [
      (lambda: open_run(tmp_path), "is not a training run"),
      (lambda: open_run(tmp_path / "empty"), "has no checkpoint yet"),
      (lambda: open_run(workdir, step=3), "has no step 3 (its saved steps: 2, 4)"),
      (lambda: open_run(os.path.join(workdir, "checkpoints", "2"), step=4), "is step 2 of its run, but step 4"),
      (lambda: load_model(tmp_path / "empty-nothing"), "not a converted checkpoint"),
  ]
  for call, message in cases:
    with pytest.raises(CheckpointError) as e:
      call()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
