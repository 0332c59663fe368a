"""Declarative rules between PyTorch state-dict tensors and this project's parameters, both ways.

A rule relates a few torch tensors to a few parameters and reads only its own tensors, so a converter can stream
one rule at a time. Two kinds cover every model here (the FLUX transformers and VAEs):

* `LinearRule`: torch `Linear` modules whose weights stack their rows (output features) into one logical matrix
  (e.g. diffusers' `to_q`, `to_k`, `to_v`, or BFL's fused `qkv`), and `Linear` modules of ours that split the same
  matrix by output features (`split="out"`: q/k/v and the MLP input of a single block) or by input features
  (`split="in"`: the single block's output projection over cat[attention, mlp], whose one bias belongs to the
  target that has a bias). Our kernels are `in_shape + out_shape`, torch weights `(out, in)`. `swap_halves`
  exchanges the two halves of the rows (diffusers' final-layer (scale, shift) against BFL's and ours (shift, scale)).
* `TensorRule`: one tensor to one parameter through a fixed transform: `copy` (norm scales, biases, BatchNorm
  statistics), `linear` (torch (out, in) <-> (in, out)), `conv` (torch (out, in, kh, kw) <-> (kh, kw, in, out)),
  `conv1x1` (a 1x1 convolution (out, in, 1, 1) <-> a linear (in, out)).

A rule with `layers=n` has `{i}` in its torch names and targets stacked parameters (leading layer axis).
Parameters are flat dicts: `"double_blocks.img_attn.qkv.kernel" -> array`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

# Our Linear modules: path -> (in_shape, out_shape), per layer (without the stacking axis).
Layouts = Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class LinearRule:
  sources: tuple[str, ...]          # torch module prefixes; their rows concatenate in this order
  source_rows: tuple[int, ...]      # output features of each source
  targets: tuple[str, ...]          # our Linear module paths
  split: Literal["out", "in"] = "out"
  swap_halves: bool = False
  layers: int | None = None

  def __post_init__(self):
    assert len(self.sources) == len(self.source_rows), self
    assert self.split in ("out", "in"), self


# name -> (torch -> ours, ours -> torch); each a transpose or reshape, so it maps shapes as well as arrays.
TRANSFORMS = {
    "copy": (lambda t: t, lambda p: p),
    "linear": (lambda t: t.T, lambda p: p.T),
    "conv": (lambda t: t.transpose(2, 3, 1, 0), lambda p: p.transpose(3, 2, 0, 1)),
    "conv1x1": (lambda t: t[:, :, 0, 0].T, lambda p: p.T[:, :, None, None]),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
  source: str                       # torch key
  target: str                       # parameter path
  transform: str = "copy"           # a key of TRANSFORMS
  layers: int | None = None

  def __post_init__(self):
    assert self.transform in TRANSFORMS, self


Rule = LinearRule | TensorRule


def layer_formats(rule: Rule) -> list[tuple[int | None, dict]]:
  """(layer index or None, `str.format` arguments) for each layer a rule covers."""
  return [(None, {})] if rule.layers is None else [(i, {"i": i}) for i in range(rule.layers)]


def source_keys(rule: Rule, has_bias: Mapping[str, bool], fmt: dict) -> list[str]:
  """The torch keys one layer of a rule reads. `has_bias[target]` tells which of our modules have a bias."""
  if isinstance(rule, TensorRule):
    return [rule.source.format(**fmt)]
  biased = any(has_bias[t] for t in rule.targets)
  return [f"{s}.{leaf}".format(**fmt) for s in rule.sources for leaf in (("weight", "bias") if biased else ("weight",))]


def target_keys(rule: Rule, has_bias: Mapping[str, bool]) -> list[str]:
  """The parameter paths a rule writes."""
  if isinstance(rule, TensorRule):
    return [rule.target]
  return [f"{t}.{leaf}" for t in rule.targets for leaf in ("kernel", "bias") if leaf == "kernel" or has_bias[t]]


def _swap(a: np.ndarray) -> np.ndarray:
  half = a.shape[0] // 2
  return np.concatenate([a[half:], a[:half]], axis=0)


def _target_widths(rule: LinearRule, layouts: Layouts) -> list[int]:
  return [math.prod(layouts[t][1] if rule.split == "out" else layouts[t][0]) for t in rule.targets]


def to_params(rule: Rule, tensors: Mapping[str, np.ndarray], fmt: dict, layouts: Layouts,
              has_bias: Mapping[str, bool]) -> dict[str, np.ndarray]:
  """One layer of a rule: torch tensors (already shape-checked) -> {parameter path: array} (unstacked)."""
  if isinstance(rule, TensorRule):
    return {rule.target: TRANSFORMS[rule.transform][0](np.asarray(tensors[rule.source.format(**fmt)]))}
  w = np.concatenate([tensors[f"{s}.weight".format(**fmt)] for s in rule.sources], axis=0)
  biased = [t for t in rule.targets if has_bias[t]]
  b = np.concatenate([tensors[f"{s}.bias".format(**fmt)] for s in rule.sources]) if biased else None
  if rule.swap_halves:
    w, b = _swap(w), (None if b is None else _swap(b))
  bounds = np.cumsum(_target_widths(rule, layouts))[:-1]
  out = {}
  for t, piece in zip(rule.targets, np.split(w, bounds, axis=0 if rule.split == "out" else 1)):
    in_shape, out_shape = layouts[t]
    out[f"{t}.kernel"] = np.ascontiguousarray(piece.T).reshape(in_shape + out_shape)
  if b is not None:
    if rule.split == "out":
      for t, piece in zip(rule.targets, np.split(b, bounds)):
        out[f"{t}.bias"] = piece.reshape(layouts[t][1])
    else:  # one bias over the concatenated inputs, held by the one target that has a bias
      (t,) = biased
      out[f"{t}.bias"] = b.reshape(layouts[t][1])
  return out


def to_torch(rule: Rule, params: Mapping[str, np.ndarray], fmt: dict, layouts: Layouts,
             has_bias: Mapping[str, bool]) -> dict[str, np.ndarray]:
  """One layer of a rule: {parameter path: array} (unstacked) -> torch tensors."""
  if isinstance(rule, TensorRule):
    return {rule.source.format(**fmt): np.ascontiguousarray(TRANSFORMS[rule.transform][1](np.asarray(
        params[rule.target])))}
  mats = []
  for t in rule.targets:
    in_shape, out_shape = layouts[t]
    mats.append(params[f"{t}.kernel"].reshape(math.prod(in_shape), math.prod(out_shape)).T)
  w = np.concatenate(mats, axis=0 if rule.split == "out" else 1)
  biased = [t for t in rule.targets if has_bias[t]]
  b = None
  if biased:
    if rule.split == "out":
      b = np.concatenate([params[f"{t}.bias"].reshape(-1) for t in rule.targets])
    else:
      (t,) = biased
      b = params[f"{t}.bias"].reshape(-1)
  if rule.swap_halves:
    w, b = _swap(w), (None if b is None else _swap(b))
  bounds = np.cumsum(rule.source_rows)[:-1]
  out = {f"{s}.weight".format(**fmt): np.ascontiguousarray(piece)
         for s, piece in zip(rule.sources, np.split(w, bounds, axis=0))}
  if b is not None:
    out.update({f"{s}.bias".format(**fmt): np.ascontiguousarray(piece)
                for s, piece in zip(rule.sources, np.split(b, bounds))})
  return out


def torch_shapes(rule: Rule, fmt: dict, layouts: Layouts, has_bias: Mapping[str, bool],
                 param_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """The shape every torch tensor of one layer of a rule must have (for strict checking before conversion)."""
  if isinstance(rule, TensorRule):
    shape = param_shapes[rule.target]
    shape = tuple(shape[1:] if rule.layers is not None else shape)
    like = np.broadcast_to(np.zeros((), np.float32), shape)   # a view: the transform maps shapes, no data
    return {rule.source.format(**fmt): tuple(TRANSFORMS[rule.transform][1](like).shape)}
  in_width = {math.prod(layouts[t][0]) for t in rule.targets}
  if rule.split == "out":
    assert len(in_width) == 1, rule
    cols = in_width.pop()
  else:
    cols = sum(math.prod(layouts[t][0]) for t in rule.targets)
  biased = any(has_bias[t] for t in rule.targets)
  shapes = {}
  for s, rows in zip(rule.sources, rule.source_rows):
    shapes[f"{s}.weight".format(**fmt)] = (rows, cols)
    if biased:
      shapes[f"{s}.bias".format(**fmt)] = (rows,)
  return shapes
