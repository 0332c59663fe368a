"""LoRA files out: `export_lora` in diffusers/peft names, loaded into a tiny diffusers FLUX.1 / FLUX.2 model by
diffusers' own `load_lora_weights` (peft, with the file's rank_pattern / alpha_pattern), gives the forward of this
project's model with the LoRA; so does the BFL layout (FLUX.2, through diffusers' BFL LoRA reader)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

import reference as ref
from test_lora_in import _diffusers, _forward, _ours
from sparse_context_jax import lora as lora_lib
from sparse_context_jax.convert import load_state_dict
from sparse_context_jax.convert.lora_out import export_lora
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
  got = ref.torch_forward(_diffusers(tm, [(out, 1.0)]), x)
  assert ref.rel_err(base, want) > 1e-3   # the LoRA matters
  assert ref.rel_err(got, want) <= 1e-5, ref.rel_err(got, want)
  assert ref.rel_err(_forward(_ours(tm, [(out, 1.0)]), x), want) <= 1e-5   # and reads back in (lora_in)


def test_export_bfl_lora_loads_in_diffusers(tmp_path):
  tm = ref.tiny_flux2()
  ours, lora = _ours_with_lora(tm)
  cfg = ref.config_of(tm)
  x = ref.make_inputs(cfg)
  want = np.asarray(ours(**{k: jnp.asarray(v) for k, v in x.items()}))
  out = tmp_path / "lora_bfl.safetensors"
  export_lora(lora, LCFG, cfg, out, layout="bfl")
  keys = load_file(out)
  assert any(".linear1.lora_A" in k for k in keys) and all(k.startswith("diffusion_model.") for k in keys)
  got = ref.torch_forward(_diffusers(tm, [(out, 1.0)]), x)   # alpha / rank folded into B: the reader's alpha = rank
  assert ref.rel_err(got, want) <= 1e-5, ref.rel_err(got, want)
  assert ref.rel_err(_forward(_ours(tm, [(out, 1.0)]), x), want) <= 1e-5   # and reads back in (lora_in)
