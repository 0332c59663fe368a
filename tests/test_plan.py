"""`plan`: the train step compiled for virtual TPU topologies (libtpu, no TPU): memory per chip against shapes
counted independently, the parameter shardings the rules predict, exit statuses for fits / does not fit / bad
input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("libtpu", reason="plans need the TPU runtime (libtpu, in requirements-test.txt)")

from sparse_context_jax import MMDiT  # noqa: E402
from sparse_context_jax.parallel import DEFAULT_RULES  # noqa: E402
from sparse_context_jax.plan.chips import parse_topology  # noqa: E402
from sparse_context_jax.plan.train import batch_spec, largest_grid, plan_train  # noqa: E402
from sparse_context_jax.train import config as C  # noqa: E402
from sparse_context_jax.train.state import optimizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# The tiny model widened so every large array is whole (8, 128) TPU tiles: the compiler's argument bytes are then
# the arrays' bytes plus the tile padding of a few scalars and vectors.
ALIGNED = ["model.arch.in_channels=128", "model.arch.out_channels=128", "model.arch.head_dim=128",
           "model.arch.context_dim=256", "model.arch.time_channels=256", "model.arch.axes_dims=(32, 32, 32, 32)"]
SLACK = 64 * 1024


def tiny(*overrides):
  return C.apply_overrides(C.load(TINY), ALIGNED + list(overrides))


def expected_spec(shape, logical_axes, mesh_shape: dict) -> tuple:
  """The rules' prediction, written out again: a named axis takes its rule's mesh axis when that axis is > 1,
  divides the dimension and is not used yet; leading (layer) axes are never split."""
  spec, used, lead = [None] * len(shape), set(), len(shape) - len(logical_axes)
  for i, name in enumerate(logical_axes):
    axis = DEFAULT_RULES[name]
    if axis and axis not in used and mesh_shape[axis] > 1 and shape[lead + i] % mesh_shape[axis] == 0:
      spec[lead + i] = axis
      used.add(axis)
  return tuple(spec)


def independent_argument_bytes(config, mesh_shape: dict) -> int:
  """Per-device bytes of params + Adam state + batch + rng/step, from the model's shapes and the rules alone."""
  cfg = C.model_config(config)
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  total = 0
  for var in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    spec = expected_spec(var.shape, var.get_metadata()["logical_axes"], mesh_shape)
    shard = [d // (mesh_shape[a] if a else 1) for d, a in zip(var.shape, spec)]
    total += 3 * math.prod(shard) * 4     # float32 params, Adam mu and nu
  opt = jax.eval_shape(optimizer(config.train).init, jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params.to_pure_dict()))
  total += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt) if x.ndim == 0)   # counts
  data = mesh_shape["data"] * mesh_shape["fsdp"]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  for x in jax.tree.leaves(batch_spec(config, cfg, mesh, largest_grid(config))):
    total += x.size // data * x.dtype.itemsize
  return total + 2 * 4 + 4               # rng key data, step


@pytest.mark.parametrize("topology,mesh", [("v5e:2x2", (2, 1, 2)), ("v5p:2x2x2", (2, 2, 2))])
def test_tiny_plan_memory_and_shardings(topology, mesh):
  config = tiny(f"mesh={mesh}")
  top = parse_topology(topology)
  (plan,) = plan_train(config, top, ratios=(1.0,))
  mesh_shape = dict(zip(("data", "fsdp", "tensor"), mesh))
  want = independent_argument_bytes(config, mesh_shape)
  assert want <= plan.argument_bytes <= want + SLACK, (plan.argument_bytes, want)
  assert plan.params_bytes + plan.opt_bytes + plan.batch_bytes <= plan.argument_bytes
  assert plan.alias_bytes >= plan.params_bytes + plan.opt_bytes   # the state is donated
  assert 0 < plan.total_bytes < top.chip.hbm_bytes and not plan.error
  assert plan.flops > plan.model_flops * 0.99 > 0 and 0 < plan.estimate.mfu <= 1
  # golden shardings: what the compiled program takes is what the rules predict, parameter by parameter
  cfg = C.model_config(config)
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
  predicted = {"".join(f"[{k!r}]" for k in path): expected_spec(v.shape, v.get_metadata()["logical_axes"], mesh_shape)
               for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert set(plan.param_specs) == set(predicted)
  trim = lambda spec: tuple(spec) + (None,) * 8
  for key, spec in predicted.items():
    assert trim(plan.param_specs[key])[:len(spec)] == spec, key
  qkv = "['double_blocks']['img_attn']['qkv']['kernel']"
  assert plan.param_specs[qkv][:5] == (None, "fsdp" if mesh[1] > 1 else None, None, "tensor", None)


@pytest.mark.slow
def test_lora_plan_holds_the_optimizer_state_of_the_adapters_only():
  top = parse_topology("v5e:2x2")
  (full,) = plan_train(tiny("mesh=(1, 4, 1)"), top, ratios=(1.0,))
  (lora,) = plan_train(tiny("mesh=(1, 4, 1)", "lora.rank=4"), top, ratios=(1.0,))
  assert lora.params_bytes == full.params_bytes      # the frozen base, the same tree in the same shardings
  assert 0 < lora.opt_bytes < full.opt_bytes / 4     # Adam over the rank-4 factors, not the base
  assert lora.params_bytes + lora.opt_bytes + lora.batch_bytes < lora.argument_bytes < full.argument_bytes
  assert not lora.error and lora.estimate is not None


def _plan(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", "plan", *args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT)


def test_cli_fits_and_writes_json(tmp_path):
  r = _plan("--config", TINY, "--topology", "v5e-4", "--rung", "1", "--json", str(tmp_path / "plan.json"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "fits" in r.stdout and "TFLOP/step" in r.stdout
  rows = json.loads((tmp_path / "plan.json").read_text())
  assert rows["topology"] == "v5e:2x2" and rows["rungs"][0]["fits"]


def test_cli_too_large_is_exit_3():
  # a 1.6 B-parameter text projection, replicated: its Adam state alone is 4x a v5e chip
  r = _plan("--config", TINY, "--topology", "v5e:2x2", "--rung", "1", "--config.model.arch.context_dim=50000000",
            "--config.train.batch_size=4")
  assert r.returncode == 3, r.stderr[-2000:]
  assert "does NOT fit" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--topology", "v9x-8"), "unknown TPU topology 'v9x-8'; expected CHIP:AxB[xC] or CHIP-N with CHIP one of "
                              "v4, v5e, v5p, v6e"),
    (("--topology", "v5p-12"), "topology 'v5p-12': v5p-N counts TensorCores"),
    (("--topology", "v5e:2x2", "--config.mesh=(3, 1, 1)"), "mesh: mesh (3, 1, 1) needs 3 devices, but 4"),
    (("--topology", "v5e:2x2", "--rung", "0.3"), "--rung 0.3: not a rung this config draws"),
])
def test_cli_user_errors_are_one_line(args, message):
  r = _plan("--config", TINY, *args, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith(f"error: {message}") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_search_ranks_compiles_and_prints_the_chosen_overrides(tmp_path):
  r = _plan("--config", TINY, "--topology", "v5e:2x2", "--search", "--max-compiles", "1", "--plot",
            str(tmp_path / "search.png"))
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit() and " x " in line]
  times = [float(row[-4]) for row in rows]                  # the step s column
  assert len(rows) >= 8 and times == sorted(times)
  assert rows[0][-1] == "yes" and all(row[-1] == "?" for row in rows[1:])
  chosen = r.stdout.strip().splitlines()[-1]
  assert chosen.startswith("chosen (fastest that fits") and "--config.mesh='(" in chosen
  assert "--config.model.remat=" in chosen and "--config.model.scan_layers=" in chosen
  assert (tmp_path / "search.png").stat().st_size > 0
