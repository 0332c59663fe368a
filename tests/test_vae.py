"""Flax VAEs equal diffusers' AutoencoderKL / AutoencoderKLFlux2 (+ the FLUX.2 pipeline's patchify and BatchNorm)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import AutoencoderKLFlux2 as TorchKLFlux2
from flax import nnx

import reference as ref
from sparse_context_jax.convert import (load_state_dict, model_variables, params_from_state_dict, rules_for,
                                        state_dict_from_params)
from sparse_context_jax.model.vae import (VAE_PRESETS, AutoencoderKL, VAEConfig, count_vae_params, decode_tokens,
                                          encode_tokens)

TINY = {
    "flux1": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    "flux2": dict(block_out_channels=(16, 32), layers_per_block=2, latent_channels=8, norm_num_groups=8),
}


@functools.lru_cache(maxsize=None)
def torch_vae(family: str):
  torch.manual_seed(0)
  n = len(TINY[family]["block_out_channels"])
  common = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
  m = (TorchKL if family == "flux1" else TorchKLFlux2)(**TINY[family], **common).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():   # re-draw every weight: no default init hides a mapping error
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape))
      else:
        p.copy_(1 + 0.2 * torch.randn(p.shape))
    if family == "flux2":
      m.bn.running_mean.copy_(0.3 * torch.randn(m.bn.running_mean.shape))
      m.bn.running_var.copy_(0.5 + torch.rand(m.bn.running_var.shape))
  return m


@functools.lru_cache(maxsize=None)
def jax_vae(family: str):
  tm = torch_vae(family)
  cfg = VAEConfig.from_diffusers({"_class_name": type(tm).__name__, **dict(tm.config)})
  return load_state_dict(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), ref.state_dict(tm))


def _images(h=32, w=48, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)


def test_presets_match_the_released_parameter_counts():
  assert count_vae_params(VAE_PRESETS["flux1"]) == 83_819_683
  assert count_vae_params(VAE_PRESETS["flux2"]) == 84_046_115


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_encode_and_decode_equal_diffusers(family):
  tm, vae = torch_vae(family), jax_vae(family)
  x = _images()
  with torch.no_grad():
    mean = tm.encode(torch.from_numpy(x)).latent_dist.mode().numpy()
    z = np.random.default_rng(1).standard_normal(mean.shape).astype(np.float32)
    image = tm.decode(torch.from_numpy(z)).sample.numpy()
  got_mean = np.asarray(vae.encode(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
  got_image = np.asarray(vae.decode(jnp.asarray(z.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
  print(f"{family}: encode {ref.rel_err(got_mean, mean):.1e}, decode {ref.rel_err(got_image, image):.1e}")
  assert ref.rel_err(got_mean, mean) <= 1e-5
  assert ref.rel_err(got_image, image) <= 1e-5


def _torch_tokens(family, tm, x):
  """The pipelines' latents -> packed tokens, written from flux_arch.md 1.5 / 4.2 with torch view / permute
  (FLUX.1: scale and shift, then pack; FLUX.2: patchify, BatchNorm, then pack)."""
  with torch.no_grad():
    z = tm.encode(torch.from_numpy(x)).latent_dist.mode()
    B, C, h, w = z.shape
    if family == "flux1":
      z = (z - tm.config.shift_factor) * tm.config.scaling_factor
      return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * C).numpy()
    z = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, h // 2, w // 2)
    mean = tm.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(tm.bn.running_var.view(1, -1, 1, 1) + tm.config.batch_norm_eps)
    z = (z - mean) / std
    return z.reshape(B, 4 * C, -1).permute(0, 2, 1).numpy()


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_tokens_equal_the_pipelines_and_round_trip(family):
  tm, vae = torch_vae(family), jax_vae(family)
  x = _images(32, 64)
  tokens = np.asarray(encode_tokens(vae, jnp.asarray(x.transpose(0, 2, 3, 1))))
  expected = _torch_tokens(family, tm, x)
  f = 2 * vae.config.downsample   # pixels per token side
  assert tokens.shape == expected.shape == (2, (32 // f) * (64 // f), 4 * vae.config.latent_channels)
  assert ref.rel_err(tokens, expected) <= 1e-5
  decoded = np.asarray(decode_tokens(vae, jnp.asarray(tokens), 32, 64))
  direct = np.asarray(vae.decode(vae.encode(jnp.asarray(x.transpose(0, 2, 3, 1)))))
  assert ref.rel_err(decoded, direct) <= 1e-5


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_bfl_and_diffusers_layouts_convert_to_identical_parameters(family):
  tm, vae = torch_vae(family), jax_vae(family)
  cfg, shapes, sd = vae.config, model_variables(vae), ref.state_dict(tm)
  params = params_from_state_dict(cfg, sd, "diffusers")
  bfl = state_dict_from_params(cfg, params, "bfl")
  # spot checks of BFL names and shapes (flux_arch.md 4.3): reversed decoder levels, 1x1-conv attention
  levels = len(cfg.block_out_channels)
  assert np.array_equal(bfl[f"decoder.up.{levels - 1}.block.0.conv1.weight"],
                        sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
  assert bfl["encoder.mid.attn_1.q.weight"].shape == sd["encoder.mid_block.attentions.0.to_q.weight"].shape + (1, 1)
  assert np.array_equal(bfl["encoder.norm_out.weight"], sd["encoder.conv_norm_out.weight"])
  from_bfl = params_from_state_dict(cfg, bfl, "bfl")
  assert all(np.array_equal(from_bfl[k], params[k]) for k in params)
  back = state_dict_from_params(cfg, params, "diffusers")
  assert sorted(back) == sorted(set(sd) - {"bn.num_batches_tracked"})
  assert all(np.array_equal(back[k], sd[k]) for k in back)
  assert len(rules_for(cfg, "bfl")) == len(rules_for(cfg, "diffusers")) == len(shapes)


def test_strict_about_keys_and_shapes():
  from sparse_context_jax.convert import CheckpointError
  tm, vae = torch_vae("flux1"), jax_vae("flux1")
  sd = ref.state_dict(tm)
  del sd["decoder.conv_out.bias"]
  with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): decoder\.conv_out\.bias"):
    params_from_state_dict(vae.config, sd, "diffusers")
  sd = ref.state_dict(tm)
  sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:, :2]
  with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight \(16, 2, 3, 3\)"):
    params_from_state_dict(vae.config, sd, "diffusers")


def test_convert_command_takes_vaes_in_both_layouts(tmp_path):
  """diffusers `vae/` folder and BFL `ae.safetensors` -> `convert` -> `load_vae`: the same parameters, and
  encode equals diffusers."""
  import json

  from safetensors.numpy import save_file

  from sparse_context_jax import load_model, load_vae
  from sparse_context_jax.convert import CheckpointError, convert_checkpoint
  tm, vae = torch_vae("flux2"), jax_vae("flux2")
  sd = ref.state_dict(tm)
  folder = tmp_path / "vae"
  folder.mkdir()
  save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
  config = {"_class_name": "AutoencoderKLFlux2", **{k: v for k, v in dict(tm.config).items() if not k.startswith("_")}}
  (folder / "config.json").write_text(json.dumps(config))
  cfg = convert_checkpoint(folder, tmp_path / "from_diffusers")
  assert cfg == vae.config
  bfl = state_dict_from_params(cfg, params_from_state_dict(cfg, sd, "diffusers"), "bfl")
  save_file(bfl, str(tmp_path / "ae.safetensors"))
  convert_checkpoint(tmp_path / "ae.safetensors", tmp_path / "from_bfl", config=str(folder / "config.json"))
  a, b = load_vae(tmp_path / "from_diffusers"), load_vae(tmp_path / "from_bfl")
  for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
    assert np.array_equal(x[...], y[...]), p
  x = _images()
  with torch.no_grad():
    mean = tm.encode(torch.from_numpy(x)).latent_dist.mode().numpy()
  got = np.asarray(a.encode(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
  assert ref.rel_err(got, mean) <= 1e-5
  with pytest.raises(CheckpointError, match="is a converted VAE, not a transformer"):
    load_model(tmp_path / "from_bfl")
  del sd["decoder.conv_out.bias"]
  save_file(sd, str(tmp_path / "broken.safetensors"))
  with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): decoder\.conv_out\.bias"):
    convert_checkpoint(tmp_path / "broken.safetensors", tmp_path / "broken", config=str(folder / "config.json"))
  assert not (tmp_path / "broken").exists()


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_bfloat16_vae_runs_close_to_float32(family):
  import jax
  vae = jax_vae(family)
  b16 = AutoencoderKL(vae.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  # parameters cast to bfloat16; BatchNorm statistics stay float32 (they normalise the latents)
  nnx.update(b16, jax.tree.map(lambda v: v.astype(jnp.bfloat16), nnx.state(vae, nnx.Param)),
             nnx.state(vae, nnx.BatchStat))
  x = jnp.asarray(_images().transpose(0, 2, 3, 1))
  tokens = np.asarray(encode_tokens(b16, x.astype(jnp.bfloat16)))
  image = np.asarray(decode_tokens(b16, jnp.asarray(tokens), 32, 48), np.float32)
  assert b16.encoder.conv_in.kernel[...].dtype == jnp.bfloat16
  err_encode = ref.rel_err(tokens, np.asarray(encode_tokens(vae, x)))
  err_decode = ref.rel_err(image, np.asarray(decode_tokens(vae, jnp.asarray(tokens), 32, 48)))
  print(f"{family}: bfloat16 encode {err_encode:.1e}, decode {err_decode:.1e}")
  assert 1e-4 < err_encode <= 5e-2 and 1e-4 < err_decode <= 5e-2
