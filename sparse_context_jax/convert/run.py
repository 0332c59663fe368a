"""A training run as a source of weights: its config, its model and the parameters of one saved step.

    RUN_DIR/checkpoints/STEP/{state, data, meta}   written by `train` (train/checkpoint.py): state is the train
                                                   state {params, opt, ema?, rng, step} (lora? beside the frozen
                                                   base params in a LoRA run), meta {step, config, counters}
    RUN_DIR/encoders.json                          the image and text encoders the run trained with (written at
                                                   train start; `encoders/records.py` builds them again)

    run = read_run("RUN_DIR", step=None, ema=False, mesh=None)   # latest step; its EMA weights with ema=True
    run.config, run.model, run.params                            # train config (JSON), MMDiTConfig, pure pytree

`run.params` is the pure dict of the model's parameters (`nnx.state(model, nnx.Param).to_pure_dict()`: the base
model's paths, block stacks stacked), so `load_model(RUN_DIR)` and `export RUN_DIR` treat a run as one more
checkpoint. Only the weights are read (never the optimizer state), each leaf straight into its sharding. A LoRA
run's weights are its frozen base `params` with its `lora` (their EMA `ema` with ema=True: a LoRA run's EMA covers
the factors only) folded in by `lora.merge_lora`; `read_lora` gives the factors alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

import sparse_context_jax.lora as lora_lib
from sparse_context_jax.convert.checkpoint import _nest, placement, restore_tree
from sparse_context_jax.errors import CheckpointError, format_keys
from sparse_context_jax.model.config import MMDiTConfig, preset
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.parallel.rules import DEFAULT_RULES

CHECKPOINTS, STATE, META = "checkpoints", "state", "meta"
ENCODERS_FILE = "encoders.json"


def run_model_config(config) -> MMDiTConfig:
  """The MMDiT of a train config (a ConfigDict, or the JSON dict a run stores): `model.preset` with `model.arch`
  overriding its fields. TypeError / ValueError on unknown fields or values."""
  return preset(config["model"]["preset"]).replace(**dict(config["model"]["arch"]))


def is_run(path: str | os.PathLike) -> bool:
  """Whether `path` is a training run (RUN_DIR, holding checkpoints/) or one of its steps
  (RUN_DIR/checkpoints/STEP)."""
  path = Path(path)
  return (path / CHECKPOINTS).is_dir() or (path.parent.name == CHECKPOINTS and (path / STATE).is_dir())


def run_steps(run_dir: str | os.PathLike) -> list[int]:
  """The saved steps of a run, ascending (orbax's finished step folders; one still being written is not one)."""
  folder = Path(run_dir) / CHECKPOINTS
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / STATE).is_dir())


@dataclasses.dataclass(frozen=True)
class RunStep:
  """One saved step of a training run, opened: its record read, no array yet."""

  run_dir: Path
  step: int
  steps: tuple[int, ...]       # every saved step of the run
  config: dict                 # the run's train config, as it stored it (JSON)
  model: MMDiTConfig
  ema: bool                    # the EMA parameters are the ones read
  lora: bool                   # the run trained LoRA: its state holds `lora` beside the frozen base `params`
  encoders: dict | None        # the run's record of its encoders (ENCODERS_FILE), None if it wrote none

  @property
  def state_dir(self) -> Path:
    return self.run_dir / CHECKPOINTS / str(self.step) / STATE

  @property
  def base(self) -> str:
    """The state's subtree of the model's parameters: `params`, or `ema` with ema in a full run (a LoRA run's EMA
    covers its factors, so its base is always the frozen `params`)."""
    return "ema" if self.ema and not self.lora else "params"

  @property
  def adapter(self) -> str | None:
    """A LoRA run's subtree of the factors folded into the base: `lora`, or `ema` with ema; None in a full run."""
    return ("ema" if self.ema else "lora") if self.lora else None

  @property
  def lora_config(self) -> ml_collections.ConfigDict | None:
    """The run's `config.lora` (rank, alpha, targets) when it trained LoRA, else None."""
    return ml_collections.ConfigDict(self.config["lora"]) if self.lora else None

  @property
  def description(self) -> str:
    return f"training run {self.run_dir} step {self.step}" + (" (EMA)" if self.ema else "")


def open_run(path: str | os.PathLike, *, step: int | None = None, ema: bool = False) -> RunStep:
  """Opens `path` (RUN_DIR, latest step unless `step`; or RUN_DIR/checkpoints/STEP). A `CheckpointError` (one line)
  when it is not a run, has no checkpoint, lacks the step, or has no EMA and `ema` is asked."""
  path = Path(path)
  if path.parent.name == CHECKPOINTS and (path / STATE).is_dir() and path.name.isdigit():
    run_dir, in_path = path.parent.parent, int(path.name)
    if step is not None and step != in_path:
      raise CheckpointError(f"{path} is step {in_path} of its run, but step {step} was asked (give RUN_DIR with "
                            "the step, or the step folder alone)")
    step = in_path
  elif (path / CHECKPOINTS).is_dir():
    run_dir = path
  else:
    raise CheckpointError(f"{path} is not a training run (expected RUN_DIR/{CHECKPOINTS}/STEP written by `train`)")
  steps = run_steps(run_dir)
  if not steps:
    raise CheckpointError(f"training run {run_dir} has no checkpoint yet (nothing saved in {CHECKPOINTS}/)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"training run {run_dir} has no step {step} (its saved steps: "
                          f"{', '.join(map(str, steps))})")
  meta = _read_meta(run_dir, step)
  items = set(_state_metadata(run_dir / CHECKPOINTS / str(step) / STATE))
  if ema and "ema" not in items:
    raise CheckpointError(f"training run {run_dir} has no EMA parameters (train.ema_decay was "
                          f"{meta['config'].get('train', {}).get('ema_decay', 0)}); drop --ema")
  try:
    model = run_model_config(meta["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"training run {run_dir} step {step}: its stored config names no model ({e})") from None
  encoders_file = run_dir / ENCODERS_FILE
  encoders = json.loads(encoders_file.read_text()) if encoders_file.is_file() else None
  return RunStep(run_dir, step, tuple(steps), meta["config"], model, ema, "lora" in items, encoders)


def _read_meta(run_dir: Path, step: int) -> dict:
  """The step's record {step, config, counters} (orbax's handlers, not a CheckpointManager: a reader needs none of
  its bookkeeping, nor its warnings)."""
  try:
    return ocp.JsonCheckpointHandler().restore(epath.Path(run_dir / CHECKPOINTS / str(step) / META))
  except Exception as e:  # noqa: BLE001 - orbax raises many types; each means the record is unreadable
    raise CheckpointError(f"cannot read the record of step {step} in {run_dir / CHECKPOINTS}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _state_metadata(state_dir: Path) -> dict:
  """The stored train state's tree of array metadata (shapes, dtypes), read without its arrays."""
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  except Exception as e:  # noqa: BLE001 - as in _read_meta
    raise CheckpointError(f"cannot read the train state of {state_dir}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  return {k: tree[k] for k in tree.keys()}


def _flat(tree, prefix: tuple = ()) -> dict[tuple, object]:
  if hasattr(tree, "keys"):
    return {p: v for k in tree.keys() for p, v in _flat(tree[k], prefix + (str(k),)).items()}
  return {prefix: tree}


def abstract_model(cfg: MMDiTConfig, dtype, **module_kw) -> MMDiT:
  """The MMDiT of `cfg` with shapes only (nothing allocated); its variables are all parameters."""
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, **module_kw))
  rest = nnx.state(model, nnx.Not(nnx.Param))
  assert not jax.tree.leaves(rest), f"MMDiT holds variables besides its parameters: {rest}"
  return model


def abstract_lora(cfg: MMDiTConfig, lora_cfg, dtype) -> nnx.State:
  """The LoRA factors `lora_cfg` attaches to the MMDiT of `cfg` (train/state.py's `build_model`), shapes and
  logical axes only."""
  def build():
    model = MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    lora_lib.attach(model, lora_cfg, nnx.Rngs(0))
    return model
  return nnx.state(nnx.eval_shape(build), nnx.LoRAParam)


def _check_shapes(run: RunStep, subtree: str, stored: dict, want: dict[tuple, tuple], what: str) -> None:
  found = {p: tuple(m.shape) for p, m in stored.items()}
  if want != found:
    missing, unexpected = set(want) - set(found), set(found) - set(want)
    bad = [f"{'.'.join(p)} {found[p]} (expected {s})" for p, s in want.items() if p in found and found[p] != s]
    parts = [f"missing {format_keys('.'.join(p) for p in missing)}" if missing else "",
             f"unexpected {format_keys('.'.join(p) for p in unexpected)}" if unexpected else "",
             f"wrong shapes {format_keys(bad)}" if bad else ""]
    raise CheckpointError(f"{run.description}: its {subtree} do not match {what}: "
                          + "; ".join(p for p in parts if p))


def stored_dtype(run: RunStep) -> np.dtype:
  """The dtype of the run's stored weights (its `model.param_dtype`), after checking they are the model's: every
  parameter present with its shape, and a LoRA run's factors those of its `config.lora` (a CheckpointError names
  the differing keys)."""
  metadata = _state_metadata(run.state_dir)
  shapes = lambda state: {tuple(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
  checks = [(run.base, shapes(nnx.state(abstract_model(run.model, np.float32), nnx.Param)), "its config's model")]
  if run.lora:
    checks.append((run.adapter, shapes(abstract_lora(run.model, run.lora_config, np.float32)),
                   f"its config's LoRA (rank {run.lora_config.rank}, targets)"))
  dtypes = set()
  for subtree, want, what in checks:
    stored = _flat(metadata[subtree])
    _check_shapes(run, subtree, stored, want, what)
    dtypes |= {np.dtype(m.dtype) for m in stored.values()}
  if len(dtypes) != 1:
    raise CheckpointError(f"{run.description} holds weights of several dtypes {sorted(map(str, dtypes))}")
  return dtypes.pop()


def read_params(run: RunStep, *, dtype=None, mesh: jax.sharding.Mesh | None = None,
                rules: Mapping[str, str | None] = DEFAULT_RULES) -> nnx.State:
  """The full-model weights of `run` as an `nnx.State` of arrays (the parameters, or their EMA), each leaf read
  straight into its `placement` (sharded by `rules` on `mesh`), cast to `dtype` (default: as stored). A LoRA run's
  factors are read into their own placements beside the base and folded in on the devices, each kernel keeping
  its sharding (the base buffers donated: no second copy of the model)."""
  stored = stored_dtype(run)
  dtype = np.dtype(dtype) if dtype is not None else stored
  where = lambda v, dt: jax.ShapeDtypeStruct(v.shape, dt, sharding=placement(v, mesh, rules))
  flat = nnx.to_flat_state(nnx.state(abstract_model(run.model, dtype), nnx.Param))
  factors = nnx.to_flat_state(abstract_lora(run.model, run.lora_config, stored)) if run.lora else []
  targets = {(run.base, *map(str, p)): where(v, dtype) for p, v in flat}
  targets.update({(run.adapter, *map(str, p)): where(v, stored) for p, v in factors})
  got = _restore(run, targets)
  params = nnx.from_flat_state([(p, v.replace(got[(run.base, *map(str, p))])) for p, v in flat])
  if run.lora:
    base = nnx.to_pure_dict(params)
    lora = _nest({tuple(map(str, p)): got[(run.adapter, *map(str, p))] for p, _ in factors})
    merge = jax.jit(lambda b, f: lora_lib.merge_lora(b, f, run.lora_config), donate_argnums=0,
                    out_shardings=jax.tree.map(lambda a: a.sharding, base))
    nnx.replace_by_pure_dict(params, merge(base, lora))
  return params


def read_lora(run: RunStep) -> dict:
  """A LoRA run's factors (their EMA with ema) as the pure dict of host arrays in the stored dtype that
  `lora.merge_lora` and `convert.lora_out.export_lora` take; a CheckpointError (one line) for a run without LoRA."""
  if not run.lora:
    raise CheckpointError(f"{run.description} trained no LoRA (its config.lora.rank is "
                          f"{run.config.get('lora', {}).get('rank', 0)}): it has no LoRA to read")
  dtype = stored_dtype(run)
  paths = [tuple(map(str, p)) for p, _ in nnx.to_flat_state(abstract_lora(run.model, run.lora_config, dtype))]
  got = _restore(run, {(run.adapter, *p): dtype for p in paths})
  return _nest({p: got[(run.adapter, *p)] for p in paths})


def _restore(run: RunStep, targets: dict) -> dict:
  try:
    return restore_tree(run.state_dir, targets)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"cannot restore the weights of {run.description}: {e}") from None


def _host_device() -> jax.Device | None:
  """The host's CPU device, where the exporter folds a LoRA in (None: jax runs without its CPU backend)."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


class RunWeights:
  """A run's weights as the exporter reads them (`convert/streaming.py`): `read(names, layer)` gives the host
  arrays of some parameters ("double_blocks.img_attn.qkv.kernel"), of one layer of their stack (`layer`) or whole
  (None), in the stored dtype. A stack's leaves are read once, when its first layer is asked, and dropped when
  the next stack starts: the host holds one block stack at a time, never the optimizer state. A LoRA run's kernels
  come with the stack's factors folded in (`lora.merge_lora`: float32 product, cast to the stored dtype)."""

  def __init__(self, run: RunStep):
    self.run, self.config, self.dtype = run, run.model, stored_dtype(run)
    self._stack: tuple[str, dict[str, np.ndarray]] = ("", {})
    self._lora_modules: list[str] = []
    if run.lora:
      factors = nnx.to_flat_state(abstract_lora(run.model, run.lora_config, self.dtype))
      self._lora_modules = sorted({".".join(map(str, p[:-1])) for p, _ in factors})
      self._merge = jax.jit(lambda b, f: lora_lib.merge_lora(b, f, run.lora_config))

  def read(self, names, layer: int | None) -> dict[str, np.ndarray]:
    if layer is None:
      return self._read(names)
    stack = names[0].split(".")[0]
    assert all(n.split(".")[0] == stack for n in names), names
    if self._stack[0] != stack or not set(names) <= set(self._stack[1]):
      self._stack = (stack, {})   # the previous stack's arrays go before this one's arrive
      self._stack = (stack, self._read(names))
    return {n: self._stack[1][n][layer] for n in names}

  def _read(self, names) -> dict[str, np.ndarray]:
    """The parameters `names`, whole, with the factors of their LoRA modules folded in (on the host's CPU)."""
    run = self.run
    factors = [f"{m}.{leaf}" for m in self._lora_modules if f"{m}.kernel" in names for leaf in ("lora_a", "lora_b")]
    paths = {n: (run.base, *n.split(".")) for n in names}
    factor_paths = {f: (run.adapter, *f.split(".")) for f in factors}
    got = _restore(run, {p: self.dtype for p in [*paths.values(), *factor_paths.values()]})
    params = {n: got[p] for n, p in paths.items()}
    if factors:
      nest = lambda flat: jax.device_put(_nest({tuple(k.split(".")): v for k, v in flat.items()}), _host_device())
      kernels = nest({f"{f.rsplit('.', 1)[0]}.kernel": params[f"{f.rsplit('.', 1)[0]}.kernel"] for f in factors})
      merged = self._merge(kernels, nest({f: got[p] for f, p in factor_paths.items()}))
      params.update(lora_lib.flat(jax.device_get(merged)))
    return params


@dataclasses.dataclass
class Run:
  """A run's step with its weights: `config` (train config, JSON), `model` (MMDiTConfig), `params` (pure dict)."""

  info: RunStep
  params: dict

  @property
  def config(self) -> dict:
    return self.info.config

  @property
  def model(self) -> MMDiTConfig:
    return self.info.model

  @property
  def step(self) -> int:
    return self.info.step


def read_run(path: str | os.PathLike, *, step: int | None = None, ema: bool = False, dtype=None,
             mesh: jax.sharding.Mesh | None = None, rules: Mapping[str, str | None] = DEFAULT_RULES) -> Run:
  """The config, model and weights of a training run's step (see the module docstring); `open_run`'s errors."""
  info = open_run(path, step=step, ema=ema)
  return Run(info, nnx.to_pure_dict(read_params(info, dtype=dtype, mesh=mesh, rules=rules)))


def load_run_model(path: str | os.PathLike, *, step: int | None = None, ema: bool = False, dtype=None,
                   mesh: jax.sharding.Mesh | None = None, rules: Mapping[str, str | None] = DEFAULT_RULES,
                   **module_kw) -> MMDiT:
  """The MMDiT of a run's step with its weights (`load_model(RUN_DIR)`); `dtype` is the parameter and compute
  dtype (default: the run's param dtype), `module_kw` the transformer's options (scan_layers, remat, ...)."""
  info = open_run(path, step=step, ema=ema)
  params = read_params(info, dtype=dtype, mesh=mesh, rules=rules)
  dtype = jax.tree.leaves(params)[0].dtype
  model = abstract_model(info.model, dtype, **module_kw)
  nnx.update(model, params)
  return model
