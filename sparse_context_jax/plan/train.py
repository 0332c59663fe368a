"""The train step of a config compiled for a TPU topology, per rung of its bucket ladder: memory per device from
XLA's buffer assignment, FLOPs from XLA's count, and a roofline step time (`estimate.py`). `plan_local` compiles
it for this process's own devices instead (e.g. fake CPU devices), memory only.

Nothing is allocated: the state is `train.state.setup`'s abstract state (ShapeDtypeStructs in the train
shardings), the batch is ShapeDtypeStructs of the shapes the pipeline gives the config (its largest aspect
bucket, every reference slot), and the step is the train loop's own (`train.step.compile_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_context_jax.data.buckets import aspect_buckets
from sparse_context_jax.model.positions import token_grid
from sparse_context_jax.parallel import batch_sharding, make_mesh
from sparse_context_jax.plan.chips import Topology
from sparse_context_jax.plan.estimate import Estimate, estimate
from sparse_context_jax.train import config as run_config
from sparse_context_jax.train.objective import ladder
from sparse_context_jax.train.state import setup
from sparse_context_jax.train.step import compile_step


@dataclasses.dataclass
class RungPlan:
  """One compiled rung. Bytes are per device; `flops` counts the whole step on all devices (every layer, the
  recomputation of remat included), `model_flops` the same step without remat (what MFU counts)."""

  ratio: float
  seq: int                       # text + target + reference slots: the packed sequence the step runs
  params_bytes: int
  opt_bytes: int
  batch_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  model_flops: float
  compile_seconds: float
  estimate: Estimate | None = None
  error: str = ""                # the compiler's out-of-memory message, when it refused the program
  param_specs: dict = dataclasses.field(default_factory=dict, repr=False)   # keystr -> the compiled program's spec
  lora_bytes: int = 0            # the LoRA factors (a LoRA run; `params_bytes` is then the frozen base)
  trainable_params: int = 0      # what the optimizer updates: every parameter, or the LoRA factors

  @property
  def total_bytes(self) -> int:
    """What the step holds at its peak: arguments, outputs not aliased to (donated) arguments, temporaries and
    the program itself."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def drawable_rungs(objective) -> tuple[float, ...]:
  """The keep ratios `objective.keep_ratio` can draw, ascending."""
  ratios = ladder(objective).ratios
  lo, hi = objective.keep_low - 1e-9, objective.keep_high + 1e-9
  snap = lambda r: next(x for x in ratios if x >= r - 1e-9)
  if objective.keep_dist == "ladder":
    out = {r for r in ratios if lo <= r <= hi} or {snap(objective.keep_high)}
  else:
    out = {r for r in ratios if snap(objective.keep_low) <= r <= snap(objective.keep_high)}
  if objective.dense_prob > 0:
    out.add(1.0)
  return tuple(sorted(out))


def largest_grid(config) -> tuple[int, int]:
  """The token grid of the config's aspect bucket with the most tokens (every example of a batch has one)."""
  return max((token_grid(hw) for hw in aspect_buckets(config.data.resolution)), key=lambda g: g[0] * g[1])


def batch_spec(config, cfg, mesh, grid: tuple[int, int]) -> dict:
  """The model batch (`train.batches`) as ShapeDtypeStructs over the data axes: every reference slot of the
  target's grid, `data.txt_len` text tokens."""
  B, R, T, N = config.train.batch_size, config.data.max_refs, config.data.txt_len, grid[0] * grid[1]
  shapes = {"target": ((B, N, cfg.in_channels), jnp.float32), "refs": ((B, R, N, cfg.in_channels), jnp.float32),
            "ref_valid": ((B, R), jnp.bool_), "txt": ((B, T, cfg.context_dim), jnp.float32),
            "weight": ((B,), jnp.float32)}
  if cfg.pooled_dim:
    shapes["y"] = ((B, cfg.pooled_dim), jnp.float32)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}


def shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (the most any device holds)."""
  leaves = jax.tree.leaves(tree)
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def _step_flops(config, cfg, rung, grid, remat: str) -> float:
  """XLA's FLOP count of the whole step (`train.batch_size` examples) with every layer counted.

  Lowered (not compiled) on one CPU device for one example and scaled by the batch: the count is of the program
  before partitioning, the same for every backend and mesh, and linear in the batch but for the optimizer
  update (~10 FLOPs per parameter, under 0.1% of one example's). Layers unrolled (XLA counts a scan's body once),
  XLA attention (a Pallas kernel reports no FLOPs)."""
  c = run_config.apply_overrides(config.copy_and_resolve_references(), [
      "model.scan_layers=False", f"model.remat={remat}", "model.attention_impl=xla", "train.grad_accum=1",
      "train.batch_size=1", "mesh=(1, 1, 1)"])
  return _example_flops(c.to_json_best_effort(), rung, grid) * config.train.batch_size


@functools.lru_cache(maxsize=None)
def _example_flops(config_json: str, rung, grid) -> float:
  c = ml_collections.ConfigDict(json.loads(config_json))
  cfg = run_config.model_config(c)
  mesh = make_mesh(c.mesh, jax.devices("cpu")[:1])
  static = setup(c, cfg, mesh)
  batch = batch_spec(c, cfg, mesh, grid)
  cost = compile_step(static, c, rung, batch).lower(static.abstract, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


_OOM = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|exceeds the memory", re.I)


def plan_rung(config, topology: Topology | None, devices, ratio: float, count_flops: bool = True) -> RungPlan:
  """Compiles the config's step at one rung for `devices` (the topology's) and measures it. Without a topology
  (other devices) there is no roofline estimate; without `count_flops` the FLOPs are NaN (lowering the unrolled
  step takes minutes for a large model)."""
  cfg = run_config.model_config(config)
  mesh = make_mesh(config.mesh, devices)
  static = setup(config, cfg, mesh)
  grid = largest_grid(config)
  rung = ladder(config.objective).at(ratio, (grid,) * config.data.max_refs)
  batch = batch_spec(config, cfg, mesh, grid)
  seq = config.data.txt_len + rung.length(grid[0] * grid[1])
  trained = static.abstract.get("lora", static.abstract["params"])
  sizes = dict(params_bytes=shard_bytes(static.abstract["params"]), opt_bytes=shard_bytes(static.abstract["opt"]),
               batch_bytes=shard_bytes(batch), lora_bytes=shard_bytes(static.abstract.get("lora", {})),
               trainable_params=sum(x.size for x in jax.tree.leaves(trained)))
  flops = model_flops = float("nan")
  if count_flops:
    flops = _step_flops(config, cfg, rung, grid, config.model.remat)
    model_flops = flops if config.model.remat == "none" else _step_flops(config, cfg, rung, grid, "none")
  tic = time.perf_counter()
  try:
    compiled = compile_step(static, config, rung, batch).lower(static.abstract, batch).compile()
  except Exception as e:   # noqa: BLE001 - XLA raises its runtime error type; only out-of-memory is an answer
    if not _OOM.search(str(e)):
      raise
    message = " ".join(str(e).split())[:400]
    arguments = shard_bytes(static.abstract) + sizes["batch_bytes"]
    return RungPlan(ratio, seq, **sizes, argument_bytes=arguments, output_bytes=0, alias_bytes=0,
                    temp_bytes=_oom_bytes(message), code_bytes=0, flops=flops, model_flops=model_flops,
                    compile_seconds=time.perf_counter() - tic, error=message)
  seconds = time.perf_counter() - tic
  m = compiled.memory_analysis()
  plan = RungPlan(ratio, seq, **sizes, argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                  alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
                  code_bytes=m.generated_code_size_in_bytes, flops=flops, model_flops=model_flops,
                  compile_seconds=seconds)
  state_shardings = compiled.input_shardings[0][0]
  plan.param_specs = {jax.tree_util.keystr(k): tuple(sh.spec)
                      for k, sh in jax.tree_util.tree_leaves_with_path(state_shardings["params"])}
  if topology is not None and count_flops:
    plan.estimate = estimate(config, cfg, topology, tuple(mesh.shape.values()), plan.flops, plan.model_flops, seq)
  return plan


def _oom_bytes(message: str) -> int:
  """The temporaries an out-of-memory message says the program needs ("... HLO temporaries (25.34G) exceeds
  available HBM ..."), else 0."""
  m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  if not m:
    return 0
  return int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1))


def plan_train(config, topology: Topology, ratios=None, on_rung=None) -> list[RungPlan]:
  """Every drawable rung (or `ratios`) of the config compiled for `topology`; `on_rung(plan)` after each."""
  devices = topology.devices()
  run_config.validate(config, len(devices))
  plans = []
  for ratio in ratios or drawable_rungs(config.objective):
    plans.append(plan_rung(config, topology, devices, ratio))
    if on_rung is not None:
      on_rung(plans[-1])
  return plans


def plan_local(config, ratio: float = 1.0, count_flops: bool = False) -> RungPlan:
  """The config's step at one rung compiled for this process's devices (`jax.devices()`: on a CPU machine the
  `--xla_force_host_platform_device_count` fake ones), memory per device as XLA's buffer assignment for that
  backend; no roofline estimate."""
  devices = jax.devices()
  run_config.validate(config, len(devices))
  return plan_rung(config, None, devices, ratio, count_flops)
