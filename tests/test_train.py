"""Training: config errors before any compile, keep-ratio draws, sharding rules, resume, sharded == unsharded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import resumed_equals_straight
from sparse_context_jax import cli
from sparse_context_jax.convert.run import open_run
from sparse_context_jax.parallel import make_mesh, mesh_shape, param_sharding
from sparse_context_jax.train import config as C
from sparse_context_jax.train.checkpoint import CheckpointError
from sparse_context_jax.train.objective import keep_ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# One keep-ratio rung (one compiled program per run), no progress bar: the tests pay few compiles.
FAST = ["objective.keep_low=0.25", "objective.keep_high=0.25", "objective.dense_prob=0.0", "log.progress=False",
        "data.world.count=16", "train.warmup_steps=1"]


def tiny(*overrides):
  return C.apply_overrides(C.load(TINY), FAST + list(overrides))


@pytest.mark.parametrize("override, message", [
    ("nope=1", "unknown config key 'nope'"),
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("train.lr=abc", "expected a float"),
    ("objective.keep_low=0", "must lie in (0, 1]"),
    ("objective.keep_high=1.5", "must lie in (0, 1]"),
    ("mesh=(2, 1, 1)", "needs 2 devices, but 1 are available"),
    ("model.init=/no/such/checkpoint", "no converted checkpoint there"),
])
def test_bad_config_is_one_line_before_any_compile(override, message, tmp_path, capsys):
  rc = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "run"), f"--config.{override}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err
  assert not (tmp_path / "run").exists()   # failed before the workdir, the data or a program


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "give all of --coordinator, --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2 is not in"),
])
def test_bad_multi_process_flags_are_one_line(flags, message, tmp_path, capsys):
  rc = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "run")] + flags)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and message in err and "\n" not in err and not (tmp_path / "run").exists()


def test_batch_not_divisible_by_processes():
  with pytest.raises(C.ConfigError, match="not divisible by the 3 processes"):
    C.validate(tiny("train.batch_size=8", "mesh=(1, 1, -1)"), num_devices=3, num_processes=3)


def test_batch_not_divisible_by_data_axes():
  c = tiny("mesh=(2, 4, 1)", "train.batch_size=12")
  with pytest.raises(C.ConfigError, match=r"micro-batch 12 .* data x fsdp = 2 x 4 = 8"):
    C.validate(c, num_devices=8)
  C.validate(tiny("mesh=(2, 4, 1)", "train.batch_size=16"), num_devices=8)
  with pytest.raises(C.ConfigError, match="not divisible"):
    C.validate(tiny("mesh=(-1, 3, 1)"), num_devices=8)


def test_world_captions_must_fit_the_text_length():
  """The stand-in text reads one word per position: a text length shorter than the world's longest caption would
  silently cut what it says about the later references."""
  C.validate(tiny(), num_devices=1)   # the tiny config reads its 2-reference captions whole (18 words)
  with pytest.raises(C.ConfigError, match=r"data.txt_len=18 .* \(36 words with data.world.max_refs=4\): set "
                                          r"data.txt_len >= 36"):
    C.validate(tiny("data.world.max_refs=4", "data.max_refs=4"), num_devices=1)
  C.validate(tiny("data.world.max_refs=4", "data.max_refs=4", "data.txt_len=36"), num_devices=1)


def test_mesh_fill():
  assert mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert make_mesh((-1, 1, 1)).shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_rules_never_split_layers_and_skip_indivisible_axes():
  mesh = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
  # stacked qkv kernel (layers, embed, qkv, heads, head_dim): embed -> fsdp, heads -> tensor, layers whole
  assert tuple(param_sharding(mesh, (4, 32, 3, 2, 16), ("embed", "qkv", "heads", "head_dim")).spec) == \
      (None, "fsdp", None, "tensor", None)
  # 3 heads do not divide over tensor = 2: replicated on that axis; embed 30 not divisible by fsdp = 4
  assert tuple(param_sharding(mesh, (30, 3, 16), ("embed", "heads", "head_dim")).spec) == (None, None, None)
  # a mesh axis is used once per parameter (adaLN: embed_in, mod, embed)
  assert tuple(param_sharding(mesh, (32, 2, 32), ("embed_in", "mod", "embed")).spec) == (None, None, "fsdp")


def test_keep_ratio_draws_rungs_in_range_and_dense_share():
  o = tiny("objective.keep_low=0.1", "objective.keep_high=0.5", "objective.dense_prob=0.25").objective
  draws = [keep_ratio(o, seed=3, step=s) for s in range(2000)]
  assert set(draws) == {0.125, 0.25, 0.375, 0.5, 1.0}
  assert abs(draws.count(1.0) / len(draws) - 0.25) < 0.04
  assert draws == [keep_ratio(o, seed=3, step=s) for s in range(2000)]   # a function of (seed, step)
  o = tiny("objective.keep_dist=uniform", "objective.keep_low=0.3", "objective.keep_high=0.4").objective
  assert {keep_ratio(o, seed=0, step=s) for s in range(200)} == {0.375, 0.5}   # snapped up to the ladder


def test_resume_gives_the_identical_next_steps_and_bad_checkpoints_fail(tmp_path):
  from sparse_context_jax.train.loop import train
  c = tiny("train.steps=4", "checkpoint.every=2")
  resumed_equals_straight(c, tmp_path, first=2)
  with pytest.raises(CheckpointError, match=r"has no EMA parameters \(train.ema_decay was 0.0\); drop --ema"):
    open_run(tmp_path / "a", ema=True)   # (the run reader: tests/test_runs.py)
  # An unreadable latest checkpoint is an error, not a fresh start.
  state_dir = tmp_path / "b" / "checkpoints" / "4" / "state"
  shutil.rmtree(state_dir)
  state_dir.mkdir()
  with pytest.raises(CheckpointError, match="cannot restore step 4"):
    train(c, str(tmp_path / "b"))


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from sparse_context_jax.train import config as C
    from sparse_context_jax.train.loop import train
    out = {{}}
    for mesh, devices in (("(1, 1, 1)", 1), ("(8, 1, 1)", 8), ("(2, 4, 1)", 8), ("(2, 2, 2)", 8)):
      c = C.apply_overrides(C.load({tiny!r}), {fast!r} + ["train.steps=3", "mesh=" + mesh,
                                                          "data.path=" + {data!r}])
      state = train(c, {work!r} + mesh.replace(" ", ""), devices=jax.devices()[:devices])
      out[mesh] = {{jax.tree_util.keystr(p): np.asarray(v).tolist()
                   for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_equals_unsharded(tmp_path):
  """3 steps of the tiny model on meshes 8x1x1, 2x4x1, 2x2x2 of 8 fake CPU devices equal one device."""
  from sparse_context_jax.train.loop import dataset_path
  data = dataset_path(tiny(), str(tmp_path))   # the world, written once for all four runs
  script = SHARDED.format(root=ROOT, tiny=TINY, fast=FAST, data=data, work=str(tmp_path / "run"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  ref = out.pop("(1, 1, 1)")
  for mesh, params in out.items():
    for k, v in ref.items():
      a, b = np.asarray(params[k]), np.asarray(v)
      rel = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)
      assert rel <= 1e-5, (mesh, k, rel)


@pytest.mark.slow   # ~8 min on the loaded 2-core machine (three rungs compiled, twice); the fast check is below
def test_kv_training_from_the_cli_learns_and_resumes(tmp_path):
  """`train --config.model.arch.reference_attention=kv`: random-ratio dropping (two rungs) on the KV model, loss
  finite and falling, a run stopped at its checkpoint and resumed equals the straight one."""
  from sparse_context_jax.convert.checkpoint import read_config
  from sparse_context_jax.train.metrics import read_metrics
  flags = [f"--config.{o}" for o in FAST + ["objective.keep_low=0.25", "objective.keep_high=0.5", "train.steps=8",
                                            "checkpoint.every=4", "train.lr=3e-3", "model.arch.reference_attention=kv"]]
  run = lambda work, *more: cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / work), *more, *flags])
  assert run("a") == 0
  assert run("b", "--steps", "4") == 0 and run("b") == 0
  curve = lambda d: [(m["step"], m["loss"]) for m in read_metrics(tmp_path / d) if "loss" in m]
  assert curve("a") == curve("b") and [s for s, _ in curve("a")] == list(range(1, 9))
  losses = [loss for _, loss in curve("a")]
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  keeps = {m["keep"] for m in read_metrics(tmp_path / "a") if "loss" in m}
  assert len(keeps) > 1 and keeps <= {0.25, 0.375, 0.5}, keeps   # random-ratio dropping: several rungs drawn
  ckpts = sorted((tmp_path / "a" / "checkpoints").iterdir())
  assert [p.name for p in ckpts] == ["4", "8"]


def test_any_architecture_field_overrides_the_preset():
  c = tiny("model.arch.reference_attention=kv")
  assert C.model_config(c).reference_attention == "kv" and C.model_config(tiny()).reference_attention == "joint"
  with pytest.raises(C.ConfigError, match="reference_attention='cache'"):
    C.model_config(tiny("model.arch.reference_attention=cache"))
  with pytest.raises(C.ConfigError, match="unknown config key 'model.arch.nope'"):
    tiny("model.arch.nope=1")
