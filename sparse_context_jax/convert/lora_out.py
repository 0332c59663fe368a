"""LoRA files out: our LoRA factors -> a safetensors file in diffusers/peft or BFL/ComfyUI naming.

The names come from the converter's key tables (convert/tables.py through convert/rules.py): a torch module of
the table gets the low-rank factors of the parts of our modules it holds. A torch module inside one of our modules
(diffusers' `to_q` of our fused q/k/v) gets its rows of B and the whole A, rank r; a torch module that fuses several
of ours (BFL's `linear1`, FLUX.2 diffusers' `to_qkv_mlp_proj`, the single blocks' output projections) gets their
factors joined block-diagonally, rank r per module of ours, with alpha scaled alike so alpha / rank is unchanged.
diffusers layout: `transformer.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r) and the peft config in
the metadata `lora_adapter_metadata` (r, lora_alpha, rank_pattern, alpha_pattern); bfl: `diffusion_model.<module>`
with alpha / rank folded into B (the loaders without a config take alpha = rank), the config kept in the metadata.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sparse_context_jax.convert.output import atomic_output
from sparse_context_jax.convert.rules import LinearRule, _blocks, _kernel_2d, layer_formats
from sparse_context_jax.lora import modules, scale

PREFIX = {"diffusers": "transformer.", "bfl": "diffusion_model."}


def torch_factors(lora_params: dict, lora_cfg, model_config,
                  layout: str) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
  """{torch module name: (lora_A (k r, in), lora_B (out, k r), k)}: k of our LoRA modules joined in it."""
  from sparse_context_jax.convert.state_dict import ModelSpec
  spec = ModelSpec(model_config)
  mods = {n: (np.asarray(a, np.float32), np.asarray(b, np.float32)) for n, (a, b) in modules(lora_params).items()}
  used, out = set(), {}
  r = int(lora_cfg.rank)
  for rule in spec.rules(layout):
    if not isinstance(rule, LinearRule) or not any(t in mods for t in rule.targets):
      continue
    if rule.swap_halves:
      raise ValueError(f"LoRA on {rule.targets} (a swapped-halves projection) cannot be written as a LoRA file")
    used.update(t for t in rule.targets if t in mods)
    for layer, fmt in layer_formats(rule):
      pieces = {}
      for t, kcols, i, rows, scols in _blocks(rule, spec.layouts):
        if t in mods:
          pieces.setdefault(i, []).append((t, kcols, rows, scols))
      for i, parts in pieces.items():
        order = list(dict.fromkeys(t for t, *_ in parts))
        cols = (sum(_kernel_2d(spec.layouts, t)[0] for t in rule.targets) if rule.split == "in"
                else _kernel_2d(spec.layouts, rule.targets[0])[0])
        A = np.zeros((r * len(order), cols), np.float32)
        B = np.zeros((rule.source_rows[i], r * len(order)), np.float32)
        for t, kcols, rows, scols in parts:
          a, b = mods[t]
          if layer is not None:
            a, b = a[layer], b[layer]
          a2, b2 = a.reshape(-1, r), b.reshape(r, -1)      # (in_t, r), (r, out_t)
          blk = slice(order.index(t) * r, (order.index(t) + 1) * r)
          A[blk, scols] = a2.T
          B[rows, blk] = b2[:, kcols].T
        out[rule.sources[i].format(**fmt)] = (A, B, len(order))
  unused = sorted(set(mods) - used)
  if unused:
    raise ValueError(f"LoRA modules with no {layout} name: {unused}")
  return out


def export_lora(lora_params: dict, lora_cfg, model_config, out: str | os.PathLike, layout: str = "diffusers") -> None:
  """Writes the LoRA alone to `out` (.safetensors) in `layout` ("diffusers" or "bfl"); see the module doc."""
  from safetensors.numpy import save_file
  if layout not in PREFIX:
    raise ValueError(f"layout={layout!r}; expected 'diffusers' or 'bfl'")
  r, alpha, s = int(lora_cfg.rank), float(lora_cfg.alpha), scale(lora_cfg)
  factors = torch_factors(lora_params, lora_cfg, model_config, layout)
  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for name, (A, B, k) in factors.items():
    key = PREFIX[layout] + name
    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(A)
    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(B * s if layout == "bfl" else B)
    if k > 1:
      rank_pattern[name], alpha_pattern[name] = k * r, k * alpha
  peft = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
          "target_modules": sorted(factors)}
  meta = {"format": "pt", "sparse_context_jax.lora": json.dumps({"rank": r, "alpha": alpha, "layout": layout,
                                                                  "targets": list(lora_cfg.targets)})}
  if layout == "diffusers":
    meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in peft.items()}, sort_keys=True)
  with atomic_output(out, force=True, directory=False) as tmp:   # nothing at `out` unless the whole file is written
    save_file(tensors, str(tmp), metadata=meta)
