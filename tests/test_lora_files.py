"""LoRA files out: `export_lora` in diffusers/peft names, applied to a tiny diffusers FLUX.1 / FLUX.2 model the way
peft applies it (W += lora_alpha / r * B . A, per module with rank_pattern / alpha_pattern), gives the forward of
this project's model with the LoRA; the BFL layout goes through diffusers' own BFL LoRA converter (FLUX.2)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

import reference as ref
from sparse_context_jax import lora as lora_lib
from sparse_context_jax.convert import load_state_dict
from sparse_context_jax.lora.files import export_lora
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.train.state import split_state

LCFG = ml_collections.ConfigDict(dict(rank=3, alpha=6.0, targets=lora_lib.DEFAULT_TARGETS + lora_lib.MLP_TARGETS))


def _ours_with_lora(tm):
  model = load_state_dict(MMDiT(ref.config_of(tm), rngs=nnx.Rngs(0)), ref.state_dict(tm))
  lora_lib.attach(model, LCFG, nnx.Rngs(1))
  graphdef, params, lora = split_state(model)
  keys = iter(jax.random.split(jax.random.key(2), 200))
  lora = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.normal(next(keys), x.shape) * 0.3 if p[-1].key == "lora_b" else x, lora)
  return nnx.merge(graphdef, params, nnx.State(lora)), lora


@torch.no_grad()
def _apply_peft_style(tm, tensors: dict, peft: dict, prefix: str):
  mods = dict(tm.named_modules())
  names = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors})
  for n in names:
    A, B = tensors[f"{prefix}{n}.lora_A.weight"], tensors[f"{prefix}{n}.lora_B.weight"]
    r = peft.get("rank_pattern", {}).get(n, peft["r"])
    alpha = peft.get("alpha_pattern", {}).get(n, peft["lora_alpha"])
    assert A.shape[0] == r == B.shape[1], (n, A.shape, B.shape, r)
    mods[n].weight += torch.from_numpy(alpha / r * (B @ A))   # KeyError: a name diffusers' model does not have


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_export_diffusers_lora_matches_diffusers_forward(tmp_path, family):
  tm = ref.tiny_flux1() if family == "flux1" else ref.tiny_flux2()
  ours, lora = _ours_with_lora(tm)
  cfg = ref.config_of(tm)
  x = ref.make_inputs(cfg)
  want = np.asarray(ours(**{k: jnp.asarray(v) for k, v in x.items()}))
  out = tmp_path / "lora.safetensors"
  export_lora(lora, LCFG, cfg, out)
  tensors = load_file(out)
  with safe_open(out, "np") as f:
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
  peft = {k.removeprefix("transformer."): v for k, v in meta.items()}
  assert peft["r"] == 3 and peft["lora_alpha"] == 6.0
  assert all(k.startswith("transformer.") for k in tensors)
  base = ref.torch_forward(tm, x)
  _apply_peft_style(tm, tensors, peft, "transformer.")
  got = ref.torch_forward(tm, x)
  assert ref.rel_err(base, want) > 1e-3   # the LoRA matters
  assert ref.rel_err(got, want) <= 1e-5, ref.rel_err(got, want)


def test_export_bfl_lora_reads_through_diffusers_converter(tmp_path):
  from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers
  tm = ref.tiny_flux2()
  ours, lora = _ours_with_lora(tm)
  cfg = ref.config_of(tm)
  x = ref.make_inputs(cfg)
  want = np.asarray(ours(**{k: jnp.asarray(v) for k, v in x.items()}))
  out = tmp_path / "lora_bfl.safetensors"
  export_lora(lora, LCFG, cfg, out, layout="bfl")
  raw = {k: torch.from_numpy(v) for k, v in load_file(out).items()}
  assert any(".linear1.lora_A" in k for k in raw) and all(k.startswith("diffusion_model.") for k in raw)
  converted = {k: v.numpy() for k, v in _convert_non_diffusers_flux2_lora_to_diffusers(raw).items()}
  # alpha / rank folded into B: the loaders' alpha = rank
  ranks = {k.rsplit(".lora_", 1)[0].removeprefix("transformer."): v.shape[0] for k, v in converted.items()
           if ".lora_A" in k}
  _apply_peft_style(tm, converted, {"r": 0, "lora_alpha": 0, "rank_pattern": ranks, "alpha_pattern": ranks},
                    "transformer.")
  assert ref.rel_err(ref.torch_forward(tm, x), want) <= 1e-5
