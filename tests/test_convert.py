"""The diffusers and BFL key tables: exact both ways, strict about keys and shapes."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import TINY, torch_model
from sparse_context_jax.convert import CheckpointError, params_from_state_dict, state_dict_from_params


def test_diffusers_round_trip_is_bit_exact(tiny_name):
  tm = torch_model(tiny_name)
  cfg, sd = ref.config_of(tm), ref.state_dict(tm)
  params = params_from_state_dict(cfg, sd, "diffusers")
  back = state_dict_from_params(cfg, params, "diffusers")
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


def _bfl_from_diffusers(cfg, sd) -> dict[str, np.ndarray]:
  """The BFL layout of a diffusers state dict, written from flux_arch.md section 3 independently of our tables."""
  out, D = {}, cfg.hidden_size
  cat = lambda *ks: np.concatenate([sd[k] for k in ks], axis=0)
  swap = lambda a: np.concatenate([a[D:], a[:D]], axis=0)
  emb = "time_text_embed" if cfg.family == "flux1" else "time_guidance_embed"
  leaves = ("weight", "bias") if cfg.bias else ("weight",)
  simple = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
            "time_in.in_layer": f"{emb}.timestep_embedder.linear_1",
            "time_in.out_layer": f"{emb}.timestep_embedder.linear_2"}
  if cfg.guidance_embed:
    simple.update({"guidance_in.in_layer": f"{emb}.guidance_embedder.linear_1",
                   "guidance_in.out_layer": f"{emb}.guidance_embedder.linear_2"})
  if cfg.pooled_dim:
    simple.update({"vector_in.in_layer": f"{emb}.text_embedder.linear_1",
                   "vector_in.out_layer": f"{emb}.text_embedder.linear_2"})
  if cfg.shared_modulation:
    simple.update({"double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
                   "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
                   "single_stream_modulation.lin": "single_stream_modulation.linear"})
  for i in range(cfg.depth_double):
    d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
    mlp = ("net.0.proj", "net.2") if cfg.family == "flux1" else ("linear_in", "linear_out")
    simple.update({f"{b}.img_attn.proj": f"{d}.attn.to_out.0", f"{b}.txt_attn.proj": f"{d}.attn.to_add_out",
                   f"{b}.img_mlp.0": f"{d}.ff.{mlp[0]}", f"{b}.img_mlp.2": f"{d}.ff.{mlp[1]}",
                   f"{b}.txt_mlp.0": f"{d}.ff_context.{mlp[0]}", f"{b}.txt_mlp.2": f"{d}.ff_context.{mlp[1]}"})
    if not cfg.shared_modulation:
      simple.update({f"{b}.img_mod.lin": f"{d}.norm1.linear", f"{b}.txt_mod.lin": f"{d}.norm1_context.linear"})
    for leaf in leaves:
      out[f"{b}.img_attn.qkv.{leaf}"] = cat(*(f"{d}.attn.to_{x}.{leaf}" for x in "qkv"))
      out[f"{b}.txt_attn.qkv.{leaf}"] = cat(*(f"{d}.attn.add_{x}_proj.{leaf}" for x in "qkv"))
    for s, n in (("img", ""), ("txt", "added_")):
      out[f"{b}.{s}_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_{n}q.weight"]
      out[f"{b}.{s}_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_{n}k.weight"]
  for i in range(cfg.depth_single):
    d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    if cfg.family == "flux1":
      for leaf in leaves:
        out[f"{b}.linear1.{leaf}"] = cat(*(f"{d}.attn.to_{x}.{leaf}" for x in "qkv"), f"{d}.proj_mlp.{leaf}")
      simple.update({f"{b}.linear2": f"{d}.proj_out", f"{b}.modulation.lin": f"{d}.norm.linear"})
    else:
      simple.update({f"{b}.linear1": f"{d}.attn.to_qkv_mlp_proj", f"{b}.linear2": f"{d}.attn.to_out"})
    out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
    out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
  for bfl, diffusers in simple.items():
    for leaf in leaves:
      out[f"{bfl}.{leaf}"] = sd[f"{diffusers}.{leaf}"]
  for leaf in leaves:
    out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap(sd[f"norm_out.linear.{leaf}"])
  return out


def test_bfl_layout_converts_to_identical_parameters(tiny_name):
  tm = torch_model(tiny_name)
  cfg, sd = ref.config_of(tm), ref.state_dict(tm)
  bfl = _bfl_from_diffusers(cfg, sd)
  from_diffusers = params_from_state_dict(cfg, sd, "diffusers")
  from_bfl = params_from_state_dict(cfg, bfl, "bfl")
  assert sorted(from_bfl) == sorted(from_diffusers)
  for k in from_bfl:
    assert np.array_equal(from_bfl[k], from_diffusers[k]), k
  exported = state_dict_from_params(cfg, from_bfl, "bfl")
  assert sorted(exported) == sorted(bfl)
  for k in bfl:
    assert np.array_equal(exported[k], bfl[k]), k


def test_strict_about_keys_and_shapes():
  tm = torch_model("flux2-klein-2ref")
  cfg, sd = ref.config_of(tm), ref.state_dict(tm)
  missing = dict(sd)
  del missing["transformer_blocks.1.attn.to_k.weight"]
  with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): transformer_blocks\.1\.attn\.to_k\.weight"):
    params_from_state_dict(cfg, missing)
  with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): pos_embed\.freqs"):
    params_from_state_dict(cfg, {**sd, "pos_embed.freqs": np.zeros(3, np.float32)})
  bad = {**sd, "proj_out.weight": np.zeros((31, cfg.hidden_size), np.float32)}
  with pytest.raises(CheckpointError, match=r"proj_out\.weight \(31, 32\) \(expected \(32, 32\)\)"):
    params_from_state_dict(cfg, bad)
  with pytest.raises(CheckpointError, match="missing"):   # a FLUX.1 checkpoint is not a FLUX.2 one
    params_from_state_dict(cfg, ref.state_dict(torch_model("flux1-kontext")))
  with pytest.raises(ValueError, match="unknown (transformer )?checkpoint layout 'comfy'"):
    params_from_state_dict(cfg, sd, "comfy")
