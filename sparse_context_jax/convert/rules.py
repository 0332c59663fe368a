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

from sparse_context_jax.convert.arrays import converted, copy_into

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


def _row_segments(rule: LinearRule) -> list[tuple[int, int, int, int]]:
  """Where the rows of the logical matrix (the sources' rows stacked, halves swapped if asked) come from:
  (first logical row, source index, first source row, row count), in logical order."""
  starts = np.cumsum((0,) + rule.source_rows)
  segments = [(i, int(starts[i]), rows) for i, rows in enumerate(rule.source_rows)]   # (source, stacked row, rows)
  if rule.swap_halves:  # logical rows: stacked rows [half, total), then [0, half)
    half, total = int(starts[-1]) // 2, int(starts[-1])
    segments = [(i, max(a, lo), min(a + n, hi) - max(a, lo)) for lo, hi in ((half, total), (0, half))
                for i, a, n in segments if max(a, lo) < min(a + n, hi)]
  out, row = [], 0
  for i, stacked, rows in segments:
    out.append((row, i, stacked - int(starts[i]), rows))
    row += rows
  return out


def _blocks(rule: LinearRule, layouts: Layouts):
  """The pieces of one layer of a Linear rule: (target, columns of the target's 2-D (in, out) kernel, source index,
  rows and columns of that source's (out, in) weight), where kernel[:, columns] == weight[rows, columns'].T."""
  segments, first = _row_segments(rule), 0
  for t, width in zip(rule.targets, _target_widths(rule, layouts)):
    for row, i, src_row, rows in segments:
      if rule.split == "out":   # the target: logical rows [first, first + width), every column
        a, b = max(row, first), min(row + rows, first + width)
        if a < b:
          yield t, slice(a - first, b - first), i, slice(src_row + a - row, src_row + b - row), slice(None)
      else:                     # the target: logical columns [first, first + width), every row
        yield t, slice(row, row + rows), i, slice(src_row, src_row + rows), slice(first, first + width)
    first += width


def _kernel_2d(layouts: Layouts, t: str) -> tuple[int, int]:
  return math.prod(layouts[t][0]), math.prod(layouts[t][1])


def to_params(rule: Rule, tensors: Mapping[str, np.ndarray], fmt: dict, layouts: Layouts,
              has_bias: Mapping[str, bool], dtype=None, empty=np.empty, copy: bool = True) -> dict[str, np.ndarray]:
  """One layer of a rule: torch tensors (already shape-checked) -> {parameter path: array} (unstacked), new
  C-contiguous arrays in `dtype` (None: the tensors' own) from `empty(shape, dtype)`. Each weight is copied once,
  transposed and cast in the same pass, straight into its parameter: no concatenated or float32 intermediate.
  `copy=False`: a tensor that needs no change (already C-contiguous in `dtype`: an embedding, a norm) is returned
  as it is, a view of `tensors`' memory."""
  if isinstance(rule, TensorRule):
    src = TRANSFORMS[rule.transform][0](np.asarray(tensors[rule.source.format(**fmt)]))
    if not copy and src.flags.c_contiguous and src.dtype == np.dtype(dtype or src.dtype):
      return {rule.target: src}
    return {rule.target: converted(src, dtype, empty)}
  weights = [tensors[f"{s}.weight".format(**fmt)] for s in rule.sources]
  dtype = np.dtype(dtype or np.result_type(*weights))
  out = {f"{t}.kernel": empty(layouts[t][0] + layouts[t][1], dtype) for t in rule.targets}
  for t, cols, i, rows, src_cols in _blocks(rule, layouts):
    copy_into(out[f"{t}.kernel"].reshape(_kernel_2d(layouts, t))[:, cols], weights[i][rows, src_cols].T)
  biased = [t for t in rule.targets if has_bias[t]]
  if biased:
    b = np.concatenate([tensors[f"{s}.bias".format(**fmt)] for s in rule.sources])
    b = converted(_swap(b) if rule.swap_halves else b, dtype)
    if rule.split == "out":
      bounds = np.cumsum(_target_widths(rule, layouts))[:-1]
      for t, piece in zip(rule.targets, np.split(b, bounds)):
        out[f"{t}.bias"] = piece.reshape(layouts[t][1])
    else:  # one bias over the concatenated inputs, held by the one target that has a bias
      (t,) = biased
      out[f"{t}.bias"] = b.reshape(layouts[t][1])
  return out


def to_torch(rule: Rule, params: Mapping[str, np.ndarray], fmt: dict, layouts: Layouts,
             has_bias: Mapping[str, bool]) -> dict[str, np.ndarray]:
  """One layer of a rule: {parameter path: array} (unstacked) -> torch tensors (new C-contiguous arrays)."""
  if isinstance(rule, TensorRule):
    return {rule.source.format(**fmt): converted(TRANSFORMS[rule.transform][1](np.asarray(params[rule.target])))}
  kernels = {t: params[f"{t}.kernel"].reshape(_kernel_2d(layouts, t)) for t in rule.targets}
  cols = sum(math.prod(layouts[t][0]) for t in rule.targets) if rule.split == "in" else \
      _kernel_2d(layouts, rule.targets[0])[0]
  dtype = np.result_type(*kernels.values())
  weights = [np.empty((rows, cols), dtype) for rows in rule.source_rows]
  for t, kernel_cols, i, rows, src_cols in _blocks(rule, layouts):
    copy_into(weights[i][rows, src_cols], kernels[t][:, kernel_cols].T)
  out = {f"{s}.weight".format(**fmt): w for s, w in zip(rule.sources, weights)}
  biased = [t for t in rule.targets if has_bias[t]]
  if biased:
    if rule.split == "out":
      b = np.concatenate([params[f"{t}.bias"].reshape(-1) for t in rule.targets])
    else:
      (t,) = biased
      b = params[f"{t}.bias"].reshape(-1)
    b = _swap(b) if rule.swap_halves else b
    bounds = np.cumsum(rule.source_rows)[:-1]
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
