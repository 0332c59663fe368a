"""Training initialised from a converted checkpoint: read straight into the train shardings, never on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from sparse_context_jax import cli
from sparse_context_jax.convert import CheckpointError, convert_checkpoint, params_from_state_dict
from sparse_context_jax.convert.safetensors_io import save_file
from sparse_context_jax.parallel import make_mesh
from sparse_context_jax.train import config as C
from sparse_context_jax.train.state import init_state, load_params, setup
from test_train import FAST, ROOT, TINY, tiny

# configs/tiny.py's model, except its time embedding width (diffusers' FLUX.2 fixes it at 256).
ARCH = ["model.arch.time_channels=256"]


def converted(folder, *, layers=(1, 1), seed=0) -> dict[str, np.ndarray]:
  """Converts a random diffusers FLUX.2 transformer shaped like configs/tiny.py into `folder`; returns the
  converted weights (dotted names)."""
  tm = ref.tiny_flux2(heads=2, head_dim=16, axes=(4, 4, 4, 4), layers=layers, in_channels=12, context=16, seed=seed)
  src = folder.parent / (folder.name + "-diffusers")
  src.mkdir(parents=True)
  save_file(ref.state_dict(tm), src / "diffusion_pytorch_model.safetensors")
  (src / "config.json").write_text(json.dumps(dict(tm.config)))
  convert_checkpoint(src, folder)
  return params_from_state_dict(ref.config_of(tm), ref.state_dict(tm))


def flat(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {".".join(str(k.key) for k in path): np.asarray(v) for path, v in leaves}


def assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


def test_initial_params_are_the_converted_weights(tmp_path):
  want = converted(tmp_path / "ckpt")
  config = tiny(*ARCH, f"model.init={tmp_path / 'ckpt'}")
  cfg = C.model_config(config)
  s = setup(config, cfg, make_mesh(config.mesh))
  params = load_params(config, cfg, s)
  assert_same(flat(params), want)
  state = init_state(config, cfg, s, params)
  assert_same(flat(state["params"]), want)
  # the loaded buffers became the state's parameters (donated), not a second copy of the model
  assert all(a.is_deleted() for a in jax.tree.leaves(params))
  assert int(state["step"]) == 0
  # and the train program starts from them
  from sparse_context_jax.train.loop import train
  assert_same(flat(train(config, str(tmp_path / "run"), stop_after=0)["params"]), want)



def test_a_lora_run_trains_adapters_over_the_converted_base(tmp_path):
  """`model.init` with `lora.rank > 0`: the frozen base is the converted checkpoint, in the run's bfloat16
  `param_dtype`, and the factors start with B = 0; the train program starts from them."""
  want = {k: np.asarray(v).astype(jnp.bfloat16) for k, v in converted(tmp_path / "ckpt").items()}
  config = tiny(*ARCH, f"model.init={tmp_path / 'ckpt'}", "model.param_dtype=bfloat16", "lora.rank=4")
  from sparse_context_jax.train.loop import train
  state = train(config, str(tmp_path / "run"), stop_after=0)
  assert_same(flat(state["params"]), want)
  factors = flat(state["lora"])
  assert factors and all(not v.any() for k, v in factors.items() if k.endswith("lora_b"))
  assert all(v.any() for k, v in factors.items() if k.endswith("lora_a"))


SHARDED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from sparse_context_jax.parallel import make_mesh
    from sparse_context_jax.train import config as C
    from sparse_context_jax.train.loop import train
    from sparse_context_jax.train.state import setup
    c = C.apply_overrides(C.load({tiny!r}), {overrides!r})
    state = train(c, {work!r}, stop_after=0)
    s = setup(c, C.model_config(c), make_mesh(c.mesh))
    out = {{}}
    for path, a in jax.tree_util.tree_leaves_with_path(state["params"]):
      want = s.shardings["params"]
      for k in path:
        want = want[k.key]
      out[".".join(str(k.key) for k in path)] = dict(
          same=a.sharding.is_equivalent_to(want, a.ndim), spec=str(want.spec), value=np.asarray(a).tolist())
    print("RESULT" + json.dumps(out))
""")


def test_params_land_in_the_train_shardings_on_8_devices(tmp_path):
  """Mesh (2, 2, 2) of 8 fake CPU devices: every loaded parameter already has the train state's sharding."""
  want = converted(tmp_path / "ckpt")
  overrides = FAST + ARCH + ["mesh=(2, 2, 2)", f"model.init={tmp_path / 'ckpt'}"]
  script = SHARDED.format(root=ROOT, tiny=TINY, overrides=overrides, work=str(tmp_path / "run"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  for name, r in out.items():
    assert r["same"], (name, r["spec"])
  specs = " ".join(r["spec"] for r in out.values())
  assert "fsdp" in specs and "tensor" in specs   # the mesh really splits parameters
  assert_same({k: np.asarray(r["value"], np.float32) for k, r in out.items()}, want)


def test_resume_never_reinitialises_from_model_init(tmp_path):
  from sparse_context_jax.train.loop import train
  first = converted(tmp_path / "a")
  other = converted(tmp_path / "b", seed=1)
  run = str(tmp_path / "run")
  trained = flat(train(tiny(*ARCH, "train.steps=2", f"model.init={tmp_path / 'a'}"), run)["params"])
  # started from `a`: step 1 has lr 0 (warmup), step 2 moved the parameters
  assert any(not np.array_equal(trained[k], first[k]) for k in first)
  resumed = flat(train(tiny(*ARCH, "train.steps=2", f"model.init={tmp_path / 'b'}"), run)["params"])
  assert_same(resumed, trained)
  assert all(not np.array_equal(resumed[k], other[k]) for k in other)


def test_a_checkpoint_of_another_model_is_refused(tmp_path, capsys):
  converted(tmp_path / "deep", layers=(2, 1))
  config = tiny(*ARCH, f"model.init={tmp_path / 'deep'}")
  cfg = C.model_config(config)
  with pytest.raises(CheckpointError, match=r"another model .* depth_double=2 there, 1 in the config"):
    load_params(config, cfg, setup(config, cfg, make_mesh(config.mesh)))
  # the train command: one `error:` line, exit status 2
  rc = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "run"), *(f"--config.{o}" for o in FAST),
                 *(f"--config.{o}" for o in ARCH), f"--config.model.init={tmp_path / 'deep'}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and "depth_double=2" in err and "\n" not in err
