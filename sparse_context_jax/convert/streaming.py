"""`convert` and `export`, streamed: the key tables' rules applied one layer at a time, read and written as they go.

A group is every rule of the unstacked parameters (embedders, shared modulations, final layer), or every rule of
one layer of one block stack. Converting a group reads only its torch tensors, so host memory holds about one
layer (the largest: a FLUX.2-dev single block, ~1 GB in bfloat16) whatever the checkpoint size.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sparse_context_jax.convert import rules as R
from sparse_context_jax.convert.checkpoint import CheckpointWriter, read_config, restore, stored_dtype, stored_path
from sparse_context_jax.convert.detect import detect_layout, resolve_config
from sparse_context_jax.convert.output import atomic_output, check_destination
from sparse_context_jax.convert.safetensors_io import DTYPE_NAMES, SafetensorsWriter
from sparse_context_jax.convert.sources import open_source
from sparse_context_jax.convert.state_dict import CheckpointError, ModelSpec, _fmt_keys, check_tensors
from sparse_context_jax.convert.tables import LAYOUTS, rules_for
from sparse_context_jax.convert.vae_convert import convert_vae, is_vae
from sparse_context_jax.model.config import MMDiTConfig

SOURCE_DTYPES = tuple(np.dtype(d) for d in ("float64", "float32", "float16", jnp.bfloat16))
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


@dataclasses.dataclass
class Group:
  layer: int | None                      # None: the unstacked parameters
  rules: list[tuple[R.Rule, dict]]       # (rule, str.format arguments of this layer)
  torch_keys: list[str]
  param_keys: list[str]                  # unstacked parameter paths (stacked ones: this layer's slice)


def rule_groups(spec: ModelSpec, layout: str) -> list[Group]:
  """The rules of `layout`, grouped by layer: the unstacked group, then each layer of each stack in order."""
  groups: dict[tuple[str, int] | None, Group] = {}
  for rule in rules_for(spec.cfg, layout):
    targets = R.target_keys(rule, spec.has_bias)
    for layer, fmt in R.layer_formats(rule):
      key = None if layer is None else (targets[0].split(".")[0], layer)
      g = groups.setdefault(key, Group(layer, [], [], []))
      g.rules.append((rule, fmt))
      g.torch_keys += R.source_keys(rule, spec.has_bias, fmt)
      g.param_keys += targets
  return [groups[k] for k in sorted(groups, key=lambda k: (k is not None, k or ("", 0)))]


def _progress(total_bytes: int, n_tensors: int, desc: str, enabled: bool | None):
  # enabled=None: shown only on a terminal (never mixed into the output of scripts and tests).
  return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=(
      not sys.stderr.isatty() if enabled is None else not enabled), postfix={"tensors": f"0/{n_tensors}"})


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                       config: str | None = None, force: bool = False, progress: bool | None = None) -> MMDiTConfig:
  """Converts a PyTorch FLUX transformer checkpoint (file or diffusers folder, BFL or diffusers layout) into a
  directory `out` of `config.json` + an orbax checkpoint, in `dtype` ("float32" or "bfloat16"). A VAE (BFL
  `ae.safetensors` or a diffusers `vae/` folder) goes to `vae_convert.convert_vae` and returns a `VAEConfig`.

  Every tensor name, shape and dtype is checked against the tables before any data is read; any mismatch is a
  `CheckpointError` naming the file and keys. Returns the detected configuration.
  """
  if dtype not in OUTPUT_DTYPES:
    raise CheckpointError(f"dtype {dtype!r}; expected one of {sorted(OUTPUT_DTYPES)}")
  out_dtype = OUTPUT_DTYPES[dtype]
  check_destination(out, force)
  source = open_source(src)
  try:
    if is_vae(source.keys(), source.config):
      return convert_vae(source, out, dtype=out_dtype, config=config, force=force)
    what = source.description
    layout = detect_layout(source.keys(), what)
    shapes = {k: source.shape(k) for k in source.keys()}
    cfg = resolve_config(shapes, layout, what, source.config, config)
    spec = ModelSpec(cfg)
    check_tensors(spec.expected_torch_shapes(layout), shapes, f"{what} ({layout} layout, {cfg.family})")
    bad = [f"{k} {DTYPE_NAMES[source.dtype(k)]}" for k in source.keys() if source.dtype(k) not in SOURCE_DTYPES]
    if bad:
      raise CheckpointError(f"{what} has tensors of non-float dtype: {_fmt_keys(bad)} (expected F32, BF16, F16 "
                            "or F64)")

    groups = rule_groups(spec, layout)
    n_tensors = len(shapes)
    with atomic_output(out, force=force, directory=True) as tmp, \
        _progress(sum(source.nbytes(k) for k in shapes), n_tensors, f"convert {Path(what).name}", progress) as bar:
      writer, done = CheckpointWriter(tmp, cfg), 0
      for g in groups:
        tensors = {k: source.read(k) for k in g.torch_keys}
        params = {}
        for rule, fmt in g.rules:
          params.update(R.to_params(rule, tensors, fmt, spec.layouts, spec.has_bias))
        writer.add({stored_path(k, g.layer): np.asarray(v, out_dtype) for k, v in params.items()})
        done += len(tensors)
        bar.update(sum(t.nbytes for t in tensors.values()))
        bar.set_postfix(tensors=f"{done}/{n_tensors}")
        del tensors, params
      writer.finish()
  finally:
    source.close()
  return cfg


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, layout: str, force: bool = False,
                      progress: bool | None = None) -> None:
  """Writes a converted checkpoint back as one `.safetensors` file in `layout` ("bfl" or "diffusers"), in the
  stored dtype, one layer at a time: the inverse of `convert_checkpoint`, tensor for tensor."""
  if layout not in LAYOUTS:
    raise CheckpointError(f"layout {layout!r}; expected one of {LAYOUTS}")
  check_destination(out, force)
  cfg = read_config(ckpt)
  spec = ModelSpec(cfg)
  dtype = stored_dtype(ckpt)
  groups = rule_groups(spec, layout)
  entries = [(name, dtype, shape) for g in groups for rule, fmt in g.rules
             for name, shape in R.torch_shapes(rule, fmt, spec.layouts, spec.has_bias, spec.param_shapes).items()]
  total = sum(int(np.prod(s)) * dtype.itemsize for _, _, s in entries)
  with atomic_output(out, force=force, directory=False) as tmp, \
      _progress(total, len(entries), f"export {Path(out).name}", progress) as bar:
    writer, done = SafetensorsWriter(tmp, entries, {"format": "pt"}), 0
    for g in groups:
      got = restore(ckpt, {stored_path(k, g.layer): dtype for k in g.param_keys})
      params = {k: got[stored_path(k, g.layer)] for k in g.param_keys}
      for rule, fmt in g.rules:
        for name, array in R.to_torch(rule, params, fmt, spec.layouts, spec.has_bias).items():
          writer.write(name, array)
          done += 1
          bar.update(array.nbytes)
      bar.set_postfix(tensors=f"{done}/{len(entries)}")
    writer.close()
