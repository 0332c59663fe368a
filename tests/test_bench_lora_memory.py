"""launch/bench_lora_memory.py on the tiny model over 4 fake CPU devices: the compiled step's argument bytes are the
sharded parameters, LoRA factors, AdamW state and batch counted independently (shapes and rules alone), and LoRA
trains and holds optimizer state for far fewer parameters than the full fine-tune."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from sparse_context_jax import MMDiT
from sparse_context_jax.lora import DEFAULT_TARGETS
from sparse_context_jax.model.layers import Linear
from sparse_context_jax.parallel import DEFAULT_RULES
from sparse_context_jax.plan.train import batch_spec, largest_grid
from sparse_context_jax.train import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "bench_lora_memory.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")
DEVICES = 4
SHAPES = ["--resolution", "64", "--refs", "2", "--txt-len", "18"]
# the tiny model at hidden width 128, so a rank-16 adapter is small beside its Linear's kernel (as at full size)
WIDE = ["model.arch.head_dim=64", "model.arch.axes_dims=(16, 16, 16, 16)"]
MESH = {"data": 1, "fsdp": DEVICES, "tensor": 1}


def shard_elems(shape, logical_axes) -> int:
  """Elements of one device's shard as the rules put it: a named axis takes its rule's mesh axis when that axis is
  > 1, divides the dimension and is not taken yet; leading (layer) axes are never split."""
  used, lead, n = set(), len(shape) - len(logical_axes), math.prod(shape[:len(shape) - len(logical_axes)])
  for i, name in enumerate(logical_axes):
    axis, d = DEFAULT_RULES[name], shape[lead + i]
    if axis and axis not in used and MESH[axis] > 1 and d % MESH[axis] == 0:
      used.add(axis)
      d //= MESH[axis]
    n *= d
  return n


def independent(config, rank: int, itemsize: int) -> dict:
  """Per-device bytes of the base parameters, the LoRA factors (rank > 0), their AdamW moments and the batch, and
  the trainable count, from the model's shapes, the LoRA targets and the sharding rules."""
  cfg = C.model_config(config)
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  base = sum(shard_elems(v.shape, v.get_metadata()["logical_axes"]) for v in variables)
  trained, trained_shard = sum(v.size for v in variables), base
  if rank:
    trained = trained_shard = 0
    for path, node in nnx.iter_graph(model):
      name = ".".join(map(str, path))
      if isinstance(node, Linear) and any(re.fullmatch(t, name) for t in DEFAULT_TARGETS):
        lead = node.kernel.shape[:node.kernel.ndim - len(node.in_shape) - len(node.out_shape)]
        axes = node.kernel.get_metadata()["logical_axes"]
        in_axes, out_axes = axes[:len(node.in_shape)], axes[len(node.in_shape):]
        a = (lead + node.in_shape + (rank,), in_axes + ("lora_rank",))
        b = (lead + (rank,) + node.out_shape, ("lora_rank",) + out_axes)
        trained += math.prod(a[0]) + math.prod(b[0])
        trained_shard += shard_elems(*a) + shard_elems(*b)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  batch = sum(x.size // DEVICES * x.dtype.itemsize
              for x in jax.tree.leaves(batch_spec(config, cfg, mesh, largest_grid(config))))
  lora = trained_shard * itemsize if rank else 0
  return {"params_bytes": base * itemsize, "lora_bytes": lora, "moments_bytes": 2 * trained_shard * itemsize,
          "batch_bytes": batch, "trainable_params": trained}


def test_lora_memory_rows_match_independent_sizes(tmp_path):
  out = tmp_path / "rows.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  args = ["--config", TINY, "--presets", "flux2-klein-4b", "--rows", "full", "lora16", "--devices", str(DEVICES),
          *SHAPES, *(f"--config.{o}" for o in WIDE), "--json", str(out)]
  r = subprocess.run([sys.executable, SCRIPT, *args],
                     env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["devices"] == DEVICES and data["mesh"] == [1, DEVICES, 1]
  full, lora = data["rows"]
  assert "| flux2-klein-4b | full, float32 |" in r.stdout and "| flux2-klein-4b | LoRA r16, bfloat16 base |" in r.stdout
  for row, rank, itemsize, dtype in ((full, 0, 4, "float32"), (lora, 16, 2, "bfloat16")):
    config = C.apply_overrides(C.load(TINY), WIDE + ["data.resolution=64", "data.max_refs=2", "data.txt_len=18",
                                                     f"train.batch_size={DEVICES}", f"mesh=(1, {DEVICES}, 1)"])
    want = independent(config, rank, itemsize)
    assert row["param_dtype"] == dtype and row["lora_rank"] == rank
    for key in ("params_bytes", "lora_bytes", "batch_bytes", "trainable_params"):
      assert row[key] == want[key], (rank, key, row[key], want[key])
    scalars = row["opt_bytes"] - want["moments_bytes"]    # AdamW's step counts
    assert 0 < scalars <= 16, (rank, row["opt_bytes"], want["moments_bytes"])
    # the compiled program takes exactly that state (+ rng key data and step) and the batch
    state = want["params_bytes"] + want["lora_bytes"] + row["opt_bytes"] + want["batch_bytes"] + 12
    assert row["argument_bytes"] == state, (rank, row["argument_bytes"], state)
    assert row["alias_bytes"] >= row["params_bytes"] * (rank == 0) + row["lora_bytes"] + want["moments_bytes"]
    assert row["temp_bytes"] > 0 and row["total_bytes"] > row["argument_bytes"] and not row["error"]
  assert lora["trainable_params"] < full["trainable_params"] / 10
  assert lora["opt_bytes"] < full["opt_bytes"] / 8 and lora["params_bytes"] == full["params_bytes"] // 2
  assert lora["ratio"] == lora["total_bytes"] / full["total_bytes"] and full["ratio"] == 1.0
