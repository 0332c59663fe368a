"""The streaming converter: PyTorch files -> orbax -> load_model equals diffusers; export gives every tensor back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import reference as ref
from conftest import inputs, torch_model
from sparse_context_jax import PRESETS, load_model
from sparse_context_jax.convert import (ModelSpec, convert_checkpoint, export_checkpoint, model_params,
                                        params_from_state_dict)
from sparse_context_jax.convert.detect import infer_config
from sparse_context_jax.convert.safetensors_io import SafetensorsFile, save_file
from sparse_context_jax.convert.sources import BFL_PREFIX
from sparse_context_jax.parallel import AXES, param_sharding
from test_convert import _bfl_from_diffusers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sharded(sd: dict, folder, config: dict, n_shards: int = 3) -> None:
  """A diffusers folder: config.json, index-sharded safetensors files and their index."""
  folder.mkdir(parents=True)
  keys, weight_map = sorted(sd), {}
  for i, part in enumerate(np.array_split(np.arange(len(keys)), n_shards)):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
    save_file({keys[j]: sd[keys[j]] for j in part}, folder / name)
    weight_map.update({keys[j]: name for j in part})
  (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (folder / "config.json").write_text(json.dumps(config))


def read_all(path) -> dict[str, np.ndarray]:
  f = SafetensorsFile(path)
  return {k: f.read(k) for k in f.keys()}


def assert_same_tensors(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k  # bit for bit, NaN-safe


def forward(model, x: dict) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))(state, x))


# FLUX.1 with and without guidance, FLUX.2 without and with guidance.
ROUND_TRIP = ["flux1-kontext", "flux1-schnell-like", "flux2-klein-1ref", "flux2-dev-3ref"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(name, tmp_path):
  tm = torch_model(name)
  cfg, sd = ref.config_of(tm), ref.state_dict(tm)
  config = dict(tm.config)

  # diffusers folder, index-sharded, config.json inside -> load_model -> forward equals diffusers
  write_sharded(sd, tmp_path / "diffusers", config)
  assert convert_checkpoint(tmp_path / "diffusers", tmp_path / "a") == cfg
  model = load_model(tmp_path / "a")
  x = inputs(name)
  assert ref.rel_err(forward(model, x), ref.torch_forward(tm, x)) <= 1e-5

  # BFL single file with the `model.diffusion_model.` prefix (tiny head dims need --config): identical parameters
  bfl = _bfl_from_diffusers(cfg, sd)
  save_file({BFL_PREFIX + k: v for k, v in bfl.items()}, tmp_path / "bfl.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(config))
  convert_checkpoint(tmp_path / "bfl.safetensors", tmp_path / "b", config=str(tmp_path / "config.json"))
  want = params_from_state_dict(cfg, sd)
  got = model_params(load_model(tmp_path / "b"))
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)

  # export to each layout gives back every tensor bit for bit
  export_checkpoint(tmp_path / "b", tmp_path / "d.safetensors", layout="diffusers")
  assert_same_tensors(read_all(tmp_path / "d.safetensors"), sd)
  export_checkpoint(tmp_path / "a", tmp_path / "f.safetensors", layout="bfl")
  assert_same_tensors(read_all(tmp_path / "f.safetensors"), bfl)


def test_diffusers_single_file_and_pipeline_folder(tmp_path):
  tm = torch_model("flux2-klein-2ref")
  cfg, sd = ref.config_of(tm), ref.state_dict(tm)
  (tmp_path / "pipe" / "transformer").mkdir(parents=True)
  save_file(sd, tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors")
  (tmp_path / "pipe" / "transformer" / "config.json").write_text(json.dumps(dict(tm.config)))
  assert convert_checkpoint(tmp_path / "pipe", tmp_path / "a") == cfg   # the pipeline root: uses transformer/
  save_file(sd, tmp_path / "one.safetensors")
  convert_checkpoint(tmp_path / "one.safetensors", tmp_path / "b", config=str(tmp_path / "pipe/transformer/config.json"))
  for out in ("a", "b"):
    got, want = model_params(load_model(tmp_path / out)), params_from_state_dict(cfg, sd)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_architecture_inferred_from_names_and_shapes_of_every_preset(layout):
  for name, cfg in PRESETS.items():
    joint = cfg.replace(reference_attention="joint")   # a KV checkpoint has the weights of its joint twin
    assert infer_config(ModelSpec(cfg).expected_torch_shapes(layout), layout, name) == joint, name


def test_bfl_file_without_config_converts(tmp_path):
  tm = ref.tiny_flux2(heads=1, head_dim=128, axes=(32, 32, 32, 32), layers=(1, 1), guidance=True)
  cfg, sd = ref.config_of(tm), ref.state_dict(tm)
  save_file(_bfl_from_diffusers(cfg, sd), tmp_path / "flux2.safetensors")
  assert convert_checkpoint(tmp_path / "flux2.safetensors", tmp_path / "out") == cfg


def test_bfloat16_is_bit_exact_through_the_cli(tmp_path):
  tm = torch_model("flux1-schnell-like")
  cfg = ref.config_of(tm)
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in ref.state_dict(tm).items()}
  bfl = _bfl_from_diffusers(cfg, sd)
  save_file(bfl, tmp_path / "bf16.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(dict(tm.config)))
  cli = [sys.executable, "-m", "sparse_context_jax"]
  # convert and export are host work: they run on the CPU whatever platforms the environment asks jax for (an
  # accelerator's runtime is never started; here a platform that does not exist would fail at once).
  env = {**os.environ, "JAX_PLATFORMS": "no_such_platform"}
  r = subprocess.run(cli + ["convert", str(tmp_path / "bf16.safetensors"), str(tmp_path / "out"), "--dtype",
                            "bfloat16", "--config", str(tmp_path / "config.json")], capture_output=True, text=True,
                     env=env)
  assert r.returncode == 0, r.stderr
  r = subprocess.run(cli + ["export", str(tmp_path / "out"), str(tmp_path / "back.safetensors"), "--layout", "bfl"],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  assert_same_tensors(read_all(tmp_path / "back.safetensors"), bfl)
  got = model_params(load_model(tmp_path / "out", dtype=ml_dtypes.bfloat16))
  want = params_from_state_dict(cfg, sd, dtype=ml_dtypes.bfloat16)
  assert all(got[k].dtype == ml_dtypes.bfloat16 and got[k].tobytes() == want[k].tobytes() for k in want)


_SHARDED_LOAD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from sparse_context_jax import load_model
    from sparse_context_jax.convert import model_params
    from sparse_context_jax.parallel import make_mesh
    from flax import nnx
    assert len(jax.devices()) == 8
    mesh = make_mesh((2, 2, 2))   # data, fsdp, tensor
    ckpt = sys.argv[1]
    sharded, single = load_model(ckpt, mesh=mesh), load_model(ckpt)
    report = {}
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
      a = var[...]
      report[".".join(map(str, path))] = dict(
          spec=[None if s is None else str(s) for s in a.sharding.spec] + [None] * (a.ndim - len(a.sharding.spec)),
          shape=list(a.shape), logical_axes=list(var.get_metadata()["logical_axes"]),
          shards=sorted({tuple(s.data.shape) for s in a.addressable_shards}), devices=len(a.sharding.device_set))
    want = model_params(single)
    report = dict(params=report, equal=all(np.array_equal(v, want[k]) for k, v in model_params(sharded).items()))
    print(json.dumps(report))
""")


def test_load_model_onto_8_devices_places_every_parameter_by_the_train_rules(tmp_path):
  tm = torch_model("flux2-klein-2ref")
  save_file(ref.state_dict(tm), tmp_path / "m.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(dict(tm.config)))
  convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "ckpt", config=str(tmp_path / "config.json"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path / "ckpt")], capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report["equal"]
  mesh = jax.sharding.AbstractMesh((2, 2, 2), AXES)
  used = set()
  for name, p in report["params"].items():
    assert p["devices"] == 8, name
    # the logical-axis rules training uses (parallel/rules.py); the layer axis of a stack is never split
    want = [None if s is None else str(s) for s in param_sharding(mesh, p["shape"], p["logical_axes"]).spec]
    assert p["spec"] == want, name
    assert all(s is None for s in want[:len(want) - len(p["logical_axes"])]), name
    # every device holds only its share: each split axis divided by its mesh axis size
    share = [n // (mesh.shape[a] if a else 1) for n, a in zip(p["shape"], want)]
    assert p["shards"] == [share], name
    used.update(a for a in want if a)
  assert used == {"fsdp", "tensor"}
