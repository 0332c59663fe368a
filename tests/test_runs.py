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


def test_export_to_bfl_and_diffusers_converts_back_to_the_same_parameters(run, tmp_path, capsys):
  """A run's weights -> one safetensors file (`export RUN_DIR`) -> `convert` -> bitwise the run's (fp32)."""
  from sparse_context_jax.convert import load, read_config
  workdir, config, final = run
  at2 = saved_state(workdir, config, 2)
  cfg = C.model_config(config)
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers()))   # tiny sizes a BFL file cannot tell
  for layout, flags, want in (("bfl", ["--ema"], final["ema"]),
                              ("diffusers", ["--step", "2"], at2["params"])):
    out, converted = tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}-converted"
    assert cli.main(["export", workdir, str(out), "--layout", layout, *flags]) == 0
    assert cli.main(["convert", str(out), str(converted), "--config", str(tmp_path / "config.json")]) == 0
    assert read_config(converted) == cfg
    from flax import nnx
    assert_bitwise(nnx.state(load(converted), nnx.Param).to_pure_dict(), want)
  capsys.readouterr()


def test_generate_from_a_run_writes_pngs_through_its_recorded_encoders(run, tmp_path):
  """`generate --model RUN_DIR`: the run's model, its stand-in pixel tokens (decoded to pooled pixels) and its
  hashed text, as it recorded them at train start; `--step` and `--ema` give other weights, so other images."""
  from PIL import Image
  workdir, config, _ = run
  record = json.loads(open(os.path.join(workdir, "encoders.json")).read())
  assert record == {"image": {"kind": "pixel-tokens", "channels": 12},
                    "text": {"kind": "hashed-text", "length": 18, "dim": 16, "pooled_dim": 0}}
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text(json.dumps({"prompt": "a red square on the left", "references": ["ref.png", "ref.png"],
                              "task": "composition", "keep": 0.5, "size": [64, 64], "steps": 2,
                              "output": "out/a.png"}) + "\n")
  latents = {}
  for flags, step, ema in (([], 4, False), (["--step", "2", "--ema"], 2, True)):
    assert cli.main(["generate", str(jobs), "--model", workdir, "--save-latents", "--force", *flags]) == 0
    png = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert png.shape == (8, 8, 3) and png.dtype == np.uint8   # a token's 16x16 pixels pool to 2x2
    report = json.loads((tmp_path / "jobs.report.json").read_text())
    assert report["run"] == {"path": workdir, "step": step, "ema": ema} and len(report["jobs"]) == 1
    latents[step] = np.load(tmp_path / "out" / "a.npy")
  assert np.all(np.isfinite(latents[4])) and not np.array_equal(latents[4], latents[2])


@pytest.mark.parametrize("argv, message", [
    (["export", "{tmp}", "{tmp}/x.safetensors", "--layout", "bfl"], "is not a converted checkpoint"),
    (["export", "{run}", "{tmp}/x.safetensors", "--layout", "bfl", "--step", "3"],
     "has no step 3 (its saved steps: 2, 4)"),
    (["export", "{run}/checkpoints/2", "{tmp}/x.safetensors", "--layout", "bfl", "--step", "4"], "is step 2"),
    (["export", "{run}", "{tmp}/x.safetensors", "--lora"], "trained no LoRA (its config.lora.rank is 0): drop --lora"),
    (["generate", "{tmp}/jobs.jsonl", "--model", "{run}", "--step", "1"], "has no step 1"),
    (["generate", "{tmp}/jobs.jsonl", "--model", "{tmp}/empty", "--ema"], "has no checkpoint yet"),
    (["generate", "{tmp}/jobs.jsonl", "--random-model", "flux2-klein-4b", "--random-vae", "flux2", "--ema"],
     "--step and --ema select the weights of a training run"),
])
def test_bad_runs_are_one_line_errors_of_the_commands(run, tmp_path, capsys, argv, message):
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  (tmp_path / "jobs.jsonl").write_text("")
  argv = [a.format(tmp=tmp_path, run=run[0]) for a in argv]
  rc = cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
  assert not (tmp_path / "x.safetensors").exists()


SHARDED = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {root!r})
from sparse_context_jax.convert.run import read_run
from sparse_context_jax.parallel import make_mesh
from sparse_context_jax.train import config as C
from sparse_context_jax.train.state import setup
config = C.apply_overrides(C.load({tiny!r}), {overrides!r} + ["mesh=(2, 2, 2)"])
mesh = make_mesh(config.mesh, jax.devices())
want = setup(config, C.model_config(config), mesh).shardings["params"]
params = read_run({run!r}, ema=True, mesh=mesh, rules=dict(config.sharding_rules)).params
out = {{}}
for (path, a), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
  out[jax.tree_util.keystr(path)] = dict(same=a.sharding.is_equivalent_to(sh, a.ndim), spec=str(a.sharding.spec),
                                         value=np.asarray(a).tolist())
print("RESULT" + json.dumps(out))
"""


def read_on_mesh(workdir, overrides) -> dict:
  """`read_run(workdir, ema=True)` onto a (2, 2, 2) mesh of 8 fake CPU devices, in a process of its own: {parameter:
  {same (its sharding is the train state's), spec, value}}, after checking every sharding is the train state's and
  the mesh really splits parameters."""
  import subprocess
  import sys
  script = SHARDED.format(root=ROOT, tiny=TINY, overrides=overrides, run=workdir)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert all(r["same"] for r in out.values()), {k: r["spec"] for k, r in out.items() if not r["same"]}
  assert "fsdp" in " ".join(r["spec"] for r in out.values())
  return out


def test_read_run_onto_a_mesh_gives_the_train_shardings(run, tmp_path):
  """On a (2, 2, 2) mesh of 8 fake CPU devices, each parameter is read straight into the sharding the train state
  gives it, with the same values."""
  workdir, _, final = run
  out = read_on_mesh(workdir, RUN)
  want = leaves(final["ema"])
  assert out.keys() == want.keys()
  for k, r in out.items():
    np.testing.assert_array_equal(np.asarray(r["value"], np.float32), want[k], err_msg=k)


def test_a_run_without_its_encoders_record_gets_them_from_its_config(run, tmp_path):
  """A run that wrote no encoders.json (trained before runs recorded them): `generate` takes the stand-ins its
  stored config names; `--vae` / `--text-encoder` still override."""
  import argparse
  from sparse_context_jax.commands import generate
  old = tmp_path / "old"
  shutil.copytree(run[0], old, ignore=shutil.ignore_patterns("world", "tensorboard", "encoders.json"))
  parser = argparse.ArgumentParser()
  generate.add_arguments(parser)
  args = parser.parse_args(["jobs.jsonl", "--model", str(old), "--step", "2"])
  generate._resolve_folders(args)
  assert args.run.step == 2 and args.run.encoders is None
  assert args.image_record == {"kind": "pixel-tokens", "channels": 12}
  assert args.text_record == {"kind": "hashed-text", "length": 18, "dim": 16, "pooled_dim": 0}
  args = parser.parse_args(["jobs.jsonl", "--model", str(old), "--vae", "some/vae", "--random-text-encoder"])
  generate._resolve_folders(args)
  assert args.image_record is None and args.text_record is None and args.vae == "some/vae"
