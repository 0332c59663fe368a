"""LoRA files in: third-party FLUX.1 / FLUX.2 LoRA safetensors merged into a loaded transformer's weights.

Names read (the formats diffusers' `lora_conversion_utils` reads for FLUX):
* diffusers / peft: `transformer.<diffusers module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), optional
  `.alpha`, and the peft config in the metadata `lora_adapter_metadata` (r, lora_alpha, rank_pattern,
  alpha_pattern, use_rslora; patterns matched as peft matches them: the pattern ends the module name);
* BFL / ComfyUI / ai-toolkit: the BFL module names (`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`) or
  diffusers' without `transformer.`, under `diffusion_model.`, `base_model.model.` or no prefix, `lora_A`/`lora_B`;
* kohya / sd-scripts: `lora_unet_<BFL name, dots as _>` or `lora_transformer_<diffusers name, dots as _>` with
  `.lora_down.weight` / `.lora_up.weight` / `.alpha`.
A module is any Linear source of the converter's key tables (`tables.py`, both layouts), so a fused torch module
(BFL `qkv` / `linear1` / `linear2`, FLUX.2's `to_qkv_mlp_proj`) and a part of one of ours (diffusers' `to_q`) map
through the same `rules._blocks` pieces that convert weights. Its update is dW = c * B . A, with
c = alpha / r (`.alpha`, else the peft config, else alpha = r: what loaders do for files without one;
alpha / sqrt(r) with `use_rslora`), times the user's scale; each of our kernels gets the rows and columns of dW
its pieces name, summed over the files, added in float32 and cast back to the kernel's dtype.

Strict: every tensor of a file must be a LoRA factor of a module of this model with the shapes its weight has;
everything is read and checked (`read_lora`) before any weight changes (`merge_loras`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.convert.rules import LinearRule, _blocks, layer_formats, torch_shapes
from sparse_context_jax.convert.safetensors_io import SafetensorsFile
from sparse_context_jax.convert.state_dict import ModelSpec
from sparse_context_jax.errors import CheckpointError, format_keys

# key suffix -> factor; dotted prefixes (then the dotted names of the tables) and kohya's (underscored names)
LEAVES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
          ".alpha": "alpha"}
DOTTED_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass(frozen=True)
class Source:
  """One torch Linear of the key tables: `rules[rule].sources[index]` at `layer` (None: not stacked)."""
  rule: tuple[str, int]     # (layout, index in that layout's rules)
  index: int
  layer: int | None
  shape: tuple[int, int]    # its weight (out, in)


@dataclasses.dataclass(frozen=True)
class LoraFile:
  """A checked LoRA file: per torch module, (A (r, in), B (out, r), alpha / r) in float32."""
  path: str
  cfg: object               # the MMDiTConfig it was checked against
  factors: Mapping[Source, tuple[np.ndarray, np.ndarray, float]]


@functools.lru_cache(maxsize=8)
def _names(cfg) -> tuple[ModelSpec, dict[str, list], dict[str, Source], dict[str, Source]]:
  """The spec, its rules per layout and {torch module name: Source}, dotted and with dots as underscores, over
  both layouts."""
  spec = ModelSpec(cfg)
  rules = {layout: spec.rules(layout) for layout in ("diffusers", "bfl")}
  dotted: dict[str, Source] = {}
  for layout, layout_rules in rules.items():
    for k, rule in enumerate(layout_rules):
      if not isinstance(rule, LinearRule):
        continue
      for layer, fmt in layer_formats(rule):
        shapes = torch_shapes(rule, fmt, spec.layouts, spec.has_bias, spec.param_shapes)
        for i, s in enumerate(rule.sources):
          name = s.format(**fmt)
          assert name not in dotted, name   # the two layouts' names must not collide
          dotted[name] = Source((layout, k), i, layer, shapes[f"{name}.weight"])
  kohya = {n.replace(".", "_"): src for n, src in dotted.items()}
  assert len(kohya) == len(dotted)
  return spec, rules, dotted, kohya


def _module(name: str, dotted, kohya) -> tuple[str, Source] | None:
  """(the module's name in the file without its prefix, Source) of a key's module part, or None if unknown."""
  for prefixes, table in ((DOTTED_PREFIXES, dotted), (KOHYA_PREFIXES, kohya)):
    for p in prefixes:
      if name.startswith(p) and name[len(p):] in table:
        return name[len(p):], table[name[len(p):]]
  return None


def _peft_config(metadata: Mapping[str, str], path: str) -> dict | None:
  """The transformer's peft config of `lora_adapter_metadata` (diffusers prefixes its keys with `transformer.`)."""
  if METADATA_KEY not in metadata:
    return None
  try:
    meta = json.loads(metadata[METADATA_KEY])
    assert isinstance(meta, dict)
  except (ValueError, AssertionError):
    raise CheckpointError(f"{path}: metadata {METADATA_KEY} is not a JSON object") from None
  if any(k.startswith("transformer.") for k in meta):
    meta = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
  if "r" not in meta:
    return None
  if meta.get("use_dora"):
    raise CheckpointError(f"{path} is a DoRA adapter (use_dora in its {METADATA_KEY}); only LoRA files are read")
  return meta


def _pattern(patterns: Mapping[str, object], name: str, default):
  """peft's `get_pattern_key`: the first pattern that ends `name` (after a dot or whole)."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def read_lora(path: str | os.PathLike, cfg) -> LoraFile:
  """Reads and checks a LoRA file for the transformer of `cfg` (an MMDiTConfig); raises a one-line
  CheckpointError naming what does not fit (a missing or truncated file, unknown keys, a factor without its pair,
  ranks that differ, shapes of another model)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"LoRA file {path} does not exist" if not os.path.exists(path) else
                          f"LoRA file {path} is not a file")
  _, _, dotted, kohya = _names(cfg)
  f = SafetensorsFile(path)
  try:
    peft = _peft_config(f.metadata, path)
    groups: dict[Source, dict] = {}
    unknown = []
    for key in f.keys():
      leaf = next((s for s in LEAVES if key.endswith(s)), None)
      found = leaf and _module(key[:-len(leaf)], dotted, kohya)
      if not found:
        unknown.append(key)
        continue
      name, src = found
      group = groups.setdefault(src, {"name": name, "keys": {}})
      if LEAVES[leaf] in group["keys"]:
        raise CheckpointError(f"{path}: {key} and {group['keys'][LEAVES[leaf]]} are the same LoRA factor")
      group["keys"][LEAVES[leaf]] = key
    if unknown:
      raise CheckpointError(f"{path}: {len(unknown)} tensor(s) are not LoRA factors of a {cfg.family} transformer "
                            f"module: {format_keys(unknown)}")
    if not groups:
      raise CheckpointError(f"{path} holds no LoRA tensors")
    unpaired = [k for g in groups.values() for k in g["keys"].values() if not {"A", "B"} <= set(g["keys"])]
    if unpaired:
      raise CheckpointError(f"{path}: LoRA factors without their lora_A / lora_B pair: {format_keys(unpaired)}")
    factors = {}
    for src, g in groups.items():
      factors[src] = _factors(f, g, src, peft, path)
  finally:
    f.close()
  return LoraFile(path, cfg, factors)


def _factors(f: SafetensorsFile, g: dict, src: Source, peft: dict | None, path: str):
  ka, kb = g["keys"]["A"], g["keys"]["B"]
  sa, sb = f.shape(ka), f.shape(kb)
  if len(sa) != 2 or len(sb) != 2:
    raise CheckpointError(f"{path}: {ka} {list(sa)} and {kb} {list(sb)} are not matrices")
  r = sa[0]
  if sb[1] != r:
    raise CheckpointError(f"{path}: rank mismatch: {ka} {list(sa)} has rank {r}, {kb} {list(sb)} rank {sb[1]}")
  out, cols = src.shape
  if (sb[0], sa[1]) != (out, cols):
    raise CheckpointError(f"{path}: {g['name']} is a ({sb[0]}, {sa[1]}) LoRA for a ({out}, {cols}) weight of this "
                          "model (a LoRA for another model?)")
  if "alpha" in g["keys"]:
    a = f.read(g["keys"]["alpha"])
    if a.size != 1:
      raise CheckpointError(f"{path}: {g['keys']['alpha']} {list(a.shape)} is not one number")
    alpha, rslora = float(a.reshape(())), False
  elif peft is not None:
    want = int(_pattern(peft.get("rank_pattern"), g["name"], peft["r"]))
    if want != r:
      raise CheckpointError(f"{path}: rank mismatch: {ka} has rank {r}, its {METADATA_KEY} says {want}")
    alpha = float(_pattern(peft.get("alpha_pattern"), g["name"], peft.get("lora_alpha", 8)))
    rslora = bool(peft.get("use_rslora"))
  else:
    alpha, rslora = float(r), False
  A, B = (np.asarray(f.read(k), np.float32) for k in (ka, kb))
  if not (np.isfinite(A).all() and np.isfinite(B).all()):
    raise CheckpointError(f"{path}: {g['name']} has non-finite LoRA factors")
  return A, B, alpha / (math.sqrt(r) if rslora else r)


@functools.lru_cache(maxsize=None)
def _add(layered: bool):
  """kernel + delta in float32, cast back; one layer of a stack in place (the stack donated)."""
  if not layered:
    return jax.jit(lambda w, d: (w.astype(jnp.float32) + d).astype(w.dtype), donate_argnums=0)

  def add_layer(w, d, i):
    layer = jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(w, (layer.astype(jnp.float32) + d).astype(w.dtype), i, 0)
  return jax.jit(add_layer, donate_argnums=0)


def merge_loras(model, loras: Sequence[tuple[str | os.PathLike | LoraFile, float]]) -> list[dict]:
  """Adds every (file, scale) LoRA to the weights of `model` (an MMDiT, in place): all files are read and checked
  first, so on any error no weight has changed. Returns [{"file", "scale", "modules"}] for reports."""
  cfg = model.config
  files = [(lf if isinstance(lf, LoraFile) else read_lora(lf, cfg), float(s)) for lf, s in loras]
  for lf, _ in files:
    if lf.cfg != cfg:
      raise CheckpointError(f"{lf.path} was checked against another model than this {cfg.family} one")
  spec, rules = _names(cfg)[:2]
  groups: dict[tuple, dict[int, list]] = {}   # (rule key, layer) -> {source index: [(A, B, coefficient)]}
  for lf, s in files:
    for src, (A, B, c) in lf.factors.items():
      if s * c != 0.0:
        groups.setdefault((src.rule, src.layer), {}).setdefault(src.index, []).append((A, B, s * c))
  for (rule_key, layer), per_source in groups.items():
    rule = rules[rule_key[0]][rule_key[1]]
    deltas = {i: sum(c * (B @ A) for A, B, c in parts) for i, parts in per_source.items()}   # (out, in) each
    kernels: dict[str, np.ndarray] = {}
    for t, kcols, i, rows, scols in _blocks(rule, spec.layouts):
      if i in deltas:
        d = kernels.setdefault(t, np.zeros((math.prod(spec.layouts[t][0]), math.prod(spec.layouts[t][1])),
                                           np.float32))
        d[:, kcols] += deltas[i][rows, scols].T
    for t, d in kernels.items():
      var = _kernel(model, t)
      d = d.reshape(spec.layouts[t][0] + spec.layouts[t][1])
      new = _add(False)(var[...], d) if layer is None else _add(True)(var[...], d, np.int32(layer))
      var.set_value(new)
  return [{"file": lf.path, "scale": s, "modules": len(lf.factors)} for lf, s in files]


def _kernel(model, target: str):
  node = model
  for part in target.split("."):
    node = getattr(node, part)
  return node.kernel
