"""PyTorch state dicts (name -> numpy array) <-> MMDiT parameters, strict in both directions."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from sparse_context_jax.convert import rules as R
from sparse_context_jax.convert.tables import rules_for
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.layers import Linear
from sparse_context_jax.model.mmdit import MMDiT


class CheckpointError(ValueError):
  """A checkpoint does not match the expected keys, shapes or format."""


def _fmt_keys(keys, limit=8) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


class ModelSpec:
  """What the tables need to know of a model: Linear layouts, which have biases, every parameter's shape."""

  def __init__(self, cfg: MMDiTConfig):
    abstract = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
    self.cfg = cfg
    self.layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    self.has_bias: dict[str, bool] = {}
    for path, node in nnx.iter_graph(abstract):
      if isinstance(node, Linear):
        name = ".".join(map(str, path))
        self.layouts[name] = (node.in_shape, node.out_shape)
        self.has_bias[name] = node.bias is not None
    self.param_shapes = {".".join(map(str, p)): tuple(v.shape)
                         for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}

  def expected_torch_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for rule in rules_for(self.cfg, layout):
      for _, fmt in R.layer_formats(rule):
        shapes.update(R.torch_shapes(rule, fmt, self.layouts, self.has_bias, self.param_shapes))
    return shapes


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Raises a `CheckpointError` naming the missing, unexpected and mis-shaped keys of `found` (name -> shape)."""
  missing, unexpected = set(expected) - set(found), set(found) - set(expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} tensor(s): {_fmt_keys(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} tensor(s): {_fmt_keys(unexpected)}")
    raise CheckpointError(f"{what} does not match the config: " + "; ".join(parts))
  bad = [f"{k} {tuple(found[k])} (expected {s})" for k, s in expected.items() if tuple(found[k]) != s]
  if bad:
    raise CheckpointError(f"{what} has wrong shapes: {_fmt_keys(bad)}")


def params_from_state_dict(cfg: MMDiTConfig, sd: Mapping[str, np.ndarray], layout: str = "diffusers",
                           dtype=np.float32, spec: ModelSpec | None = None) -> dict[str, np.ndarray]:
  """Converts a whole torch state dict to flat parameters; every key must be used, every shape must match."""
  spec = spec or ModelSpec(cfg)
  check_tensors(spec.expected_torch_shapes(layout), {k: tuple(v.shape) for k, v in sd.items()},
                f"{layout} {cfg.family} state dict")

  params: dict[str, np.ndarray] = {}
  for rule in rules_for(cfg, layout):
    per_layer = [R.to_params(rule, sd, fmt, spec.layouts, spec.has_bias) for _, fmt in R.layer_formats(rule)]
    for key in per_layer[0]:
      arrays = [np.asarray(p[key], dtype) for p in per_layer]
      params[key] = arrays[0] if rule.layers is None else np.stack(arrays)
  assert set(params) == set(spec.param_shapes), (set(params) ^ set(spec.param_shapes))
  for k, v in params.items():
    assert v.shape == spec.param_shapes[k], (k, v.shape, spec.param_shapes[k])
  return params


def state_dict_from_params(cfg: MMDiTConfig, params: Mapping[str, np.ndarray], layout: str = "diffusers",
                           spec: ModelSpec | None = None) -> dict[str, np.ndarray]:
  """Inverse of `params_from_state_dict`: flat parameters -> torch state dict (same dtype as the parameters)."""
  spec = spec or ModelSpec(cfg)
  if set(params) != set(spec.param_shapes):
    raise CheckpointError(f"parameters do not match the config: missing {_fmt_keys(set(spec.param_shapes) - set(params))}"
                          f"; unexpected {_fmt_keys(set(params) - set(spec.param_shapes))}")
  sd: dict[str, np.ndarray] = {}
  for rule in rules_for(cfg, layout):
    for layer, fmt in R.layer_formats(rule):
      view = {k: (params[k] if layer is None else params[k][layer]) for k in R.target_keys(rule, spec.has_bias)}
      sd.update(R.to_torch(rule, view, fmt, spec.layouts, spec.has_bias))
  return sd


def model_params(model: MMDiT) -> dict[str, np.ndarray]:
  """The model's parameters as a flat dict of host arrays."""
  return {".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def set_model_params(model: MMDiT, params: Mapping[str, np.ndarray]) -> None:
  """Overwrites every parameter of `model` (keys and shapes must match exactly), keeping each parameter's dtype."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  names = {".".join(map(str, p)) for p, _ in flat}
  if names != set(params):
    raise CheckpointError(f"parameter names differ: missing {_fmt_keys(names - set(params))}; "
                          f"unexpected {_fmt_keys(set(params) - names)}")
  for p, var in flat:
    value = params[".".join(map(str, p))]
    if tuple(value.shape) != tuple(var.shape):
      raise CheckpointError(f"parameter {'.'.join(map(str, p))} has shape {value.shape}, expected {var.shape}")
    var[...] = jax.numpy.asarray(value, dtype=var.dtype)


def load_state_dict(model: MMDiT, sd: Mapping[str, np.ndarray], layout: str = "diffusers") -> MMDiT:
  """Loads a torch state dict (diffusers or BFL layout) into `model` in place and returns it."""
  set_model_params(model, params_from_state_dict(model.config, sd, layout))
  return model
