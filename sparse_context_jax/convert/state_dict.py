"""PyTorch state dicts (name -> numpy array) <-> a model's variables, strict in both directions, for every kind of
model the converter knows (`kinds.KINDS`)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from sparse_context_jax.convert.rules import Rule, layer_formats, target_keys, to_params, to_torch, torch_shapes
from sparse_context_jax.convert.kinds import kind_of, rules_for
from sparse_context_jax.errors import CheckpointError, format_keys
from sparse_context_jax.model.layers import Linear


def model_variables(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Every variable of a module (parameters and statistics): dotted path -> shape."""
  return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module))}


class ModelSpec:
  """What the rules need to know of a model: its `Linear` layouts, which have biases, every variable's shape."""

  def __init__(self, cfg):
    self.cfg, self.kind = cfg, kind_of(cfg)
    abstract = self.kind.abstract(cfg)
    self.layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    self.has_bias: dict[str, bool] = {}
    for path, node in nnx.iter_graph(abstract):
      if isinstance(node, Linear):
        name = ".".join(map(str, path))
        self.layouts[name] = (node.in_shape, node.out_shape)
        self.has_bias[name] = node.bias is not None
    self.param_shapes = model_variables(abstract)

  def rules(self, layout: str) -> list[Rule]:
    return rules_for(self.cfg, layout)

  def expected_torch_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for rule in self.rules(layout):
      for _, fmt in layer_formats(rule):
        shapes.update(torch_shapes(rule, fmt, self.layouts, self.has_bias, self.param_shapes))
    return shapes

  def what(self, layout: str) -> str:
    """How errors name a state dict of this model."""
    return f"{layout} {self.kind.label(self.cfg)} state dict"


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Raises a `CheckpointError` naming the missing, unexpected and mis-shaped keys of `found` (name -> shape)."""
  missing, unexpected = set(expected) - set(found), set(found) - set(expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} tensor(s): {format_keys(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} tensor(s): {format_keys(unexpected)}")
    raise CheckpointError(f"{what} does not match the config: " + "; ".join(parts))
  bad = [f"{k} {tuple(found[k])} (expected {s})" for k, s in expected.items() if tuple(found[k]) != s]
  if bad:
    raise CheckpointError(f"{what} has wrong shapes: {format_keys(bad)}")


def params_from_state_dict(cfg, sd: Mapping[str, np.ndarray], layout: str = "diffusers", dtype=np.float32,
                           spec: ModelSpec | None = None) -> dict[str, np.ndarray]:
  """Converts a whole torch state dict to flat variables; every key must be used, every shape must match."""
  spec = spec or ModelSpec(cfg)
  sd = {k: v for k, v in sd.items() if k not in spec.kind.ignored}
  check_tensors(spec.expected_torch_shapes(layout), {k: tuple(v.shape) for k, v in sd.items()}, spec.what(layout))
  params: dict[str, np.ndarray] = {}
  for rule in spec.rules(layout):
    per_layer = [to_params(rule, sd, fmt, spec.layouts, spec.has_bias) for _, fmt in layer_formats(rule)]
    for key in per_layer[0]:
      arrays = [np.asarray(p[key], dtype) for p in per_layer]
      params[key] = arrays[0] if rule.layers is None else np.stack(arrays)
  assert set(params) == set(spec.param_shapes), (set(params) ^ set(spec.param_shapes))
  for k, v in params.items():
    assert v.shape == spec.param_shapes[k], (k, v.shape, spec.param_shapes[k])
  return params


def state_dict_from_params(cfg, params: Mapping[str, np.ndarray], layout: str = "diffusers",
                           spec: ModelSpec | None = None) -> dict[str, np.ndarray]:
  """Inverse of `params_from_state_dict`: flat variables -> torch state dict (same dtype as the variables)."""
  spec = spec or ModelSpec(cfg)
  if set(params) != set(spec.param_shapes):
    raise CheckpointError(f"parameters do not match the config: missing "
                          f"{format_keys(set(spec.param_shapes) - set(params))}; unexpected "
                          f"{format_keys(set(params) - set(spec.param_shapes))}")
  sd: dict[str, np.ndarray] = {}
  for rule in spec.rules(layout):
    for layer, fmt in layer_formats(rule):
      view = {k: (params[k] if layer is None else params[k][layer]) for k in target_keys(rule, spec.has_bias)}
      sd.update(to_torch(rule, view, fmt, spec.layouts, spec.has_bias))
  return sd


def model_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """The module's variables as a flat dict of host arrays."""
  return {".".join(map(str, p)): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(nnx.state(module))}


def set_model_params(module: nnx.Module, params: Mapping[str, np.ndarray]) -> None:
  """Overwrites every variable of `module` (keys and shapes must match exactly), keeping each one's dtype."""
  flat = nnx.to_flat_state(nnx.state(module))
  names = {".".join(map(str, p)) for p, _ in flat}
  if names != set(params):
    raise CheckpointError(f"parameter names differ: missing {format_keys(names - set(params))}; "
                          f"unexpected {format_keys(set(params) - names)}")
  for p, var in flat:
    value = params[".".join(map(str, p))]
    if tuple(value.shape) != tuple(var.shape):
      raise CheckpointError(f"parameter {'.'.join(map(str, p))} has shape {value.shape}, expected {var.shape}")
    var[...] = jax.numpy.asarray(value, dtype=var.dtype)


def load_state_dict(module: nnx.Module, sd: Mapping[str, np.ndarray], layout: str = "diffusers") -> nnx.Module:
  """Loads a torch state dict (diffusers or BFL layout) into `module` (a transformer or a VAE) in place."""
  set_model_params(module, params_from_state_dict(module.config, sd, layout))
  return module
