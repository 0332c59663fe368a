"""Configs: exact parameter counts of the released models, diffusers configs both ways, validation."""

from __future__ import annotations

import jax
import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

from sparse_context_jax import PRESETS, MMDiTConfig, count_params, preset
from sparse_context_jax.convert import ModelSpec

EXPECTED_PARAMS = {
    "flux1-dev": 11_901_408_320,
    "flux1-schnell": 11_891_178_560,
    "flux1-kontext-dev": 11_901_408_320,
    "flux2-klein-4b": 3_875_544_576,
    "flux2-klein-9b": 9_078_581_248,
    "flux2-dev": 32_223_281_152,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_param_counts_exact_and_abstract(name):
  live_before = len(jax.live_arrays())
  assert count_params(preset(name)) == EXPECTED_PARAMS[name]
  assert len(jax.live_arrays()) == live_before  # eval_shape only: not a single weight was allocated


def _meta_diffusers(cfg: MMDiTConfig):
  kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
  cls = FluxTransformer2DModel if cfg.family == "flux1" else Flux2Transformer2DModel
  with torch.device("meta"):
    return cls(**kwargs)


@pytest.mark.parametrize("name", ["flux1-dev", "flux1-schnell", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev"])
def test_real_presets_match_diffusers_models(name):
  """The real-size diffusers models (on torch's meta device, no memory): same config, same parameter count, and
  the key table covers every tensor of their state dict with the right shape."""
  cfg = preset(name)
  model = _meta_diffusers(cfg)
  assert MMDiTConfig.from_diffusers(dict(model.config)) == cfg
  assert sum(p.numel() for p in model.parameters()) == count_params(cfg)
  torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert ModelSpec(cfg).expected_torch_shapes("diffusers") == torch_shapes


def test_from_diffusers_defaults_and_class_detection():
  assert MMDiTConfig.from_diffusers({"_class_name": "Flux2Transformer2DModel"}) == preset("flux2-dev")
  assert MMDiTConfig.from_diffusers({"_class_name": "FluxTransformer2DModel"}) == preset("flux1-schnell")
  assert MMDiTConfig.from_diffusers({"guidance_embeds": True}) == preset("flux1-dev")   # no class: FLUX.1 fields
  klein = {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
           "guidance_embeds": False, "rope_theta": 2000}
  assert MMDiTConfig.from_diffusers(klein) == preset("flux2-klein-4b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_and_diffusers_round_trips(name):
  cfg = preset(name)
  assert MMDiTConfig.from_json(cfg.to_json()) == cfg
  # diffusers' transformer config cannot say "KV" (its pipeline does): the round trip gives the joint twin
  assert MMDiTConfig.from_diffusers(cfg.to_diffusers()) == cfg.replace(reference_attention="joint")


def test_klein_kv_preset_is_klein_9b_with_kv_references():
  assert preset("flux2-klein-9b-kv") == preset("flux2-klein-9b").replace(reference_attention="kv")
  assert count_params(preset("flux2-klein-9b-kv")) == EXPECTED_PARAMS["flux2-klein-9b"]


@pytest.mark.parametrize("bad, message", [
    ({"axes_dims": (16, 56, 50)}, "sum to 122, expected head_dim=128"),
    ({"axes_dims": (15, 57, 56)}, "must be even"),
    ({"mlp": "relu"}, "mlp='relu'"),
    ({"family": "flux3"}, "family='flux3'"),
    ({"num_heads": 0}, "num_heads=0"),
    ({"reference_attention": "cache"}, "reference_attention='cache'"),
    ({"reference_attention": "kv"}, "needs the shared modulation of FLUX.2"),
])
def test_invalid_configs_are_named(bad, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    preset("flux1-dev").replace(**bad)


def test_bad_diffusers_configs():
  with pytest.raises(ValueError, match="unknown fields.*'num_blocks'"):
    MMDiTConfig.from_diffusers({"_class_name": "FluxTransformer2DModel", "num_blocks": 3})
  with pytest.raises(ValueError, match="patch_size=2"):
    MMDiTConfig.from_diffusers({"_class_name": "FluxTransformer2DModel", "patch_size": 2})
  with pytest.raises(ValueError, match="AutoencoderKL"):
    MMDiTConfig.from_diffusers({"_class_name": "AutoencoderKL"})
  with pytest.raises(ValueError, match="unknown preset 'flux3'"):
    preset("flux3")
  with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
    MMDiTConfig.from_dict({**preset("flux1-dev").to_dict(), "extra": 1})
