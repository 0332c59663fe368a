"""`convert` of a whole diffusers pipeline folder (model_index.json, a tiny Flux2Transformer2DModel, AutoencoderKLFlux2
and Qwen3ForCausalLM with its tokenizer, all written by save_pretrained, and a scheduler) -> every component loads
and equals its torch module; one bad component leaves nothing; components the converter does not know are
reported."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from flax import nnx

import reference as ref
import text_reference as text_ref
from conftest import torch_model
from sparse_context_jax import load_model, load_text_encoder, load_vae
from sparse_context_jax.cli import main
from sparse_context_jax.convert import (CheckpointError, convert_pipeline, load, model_params, params_from_state_dict,
                                        pipeline_components)
from test_text_convert import save_tokenizer
from test_vae import jax_vae, torch_vae


def write_pipeline(root, *, text_encoder: bool = True, extra: dict | None = None) -> None:
  """A Flux2KleinPipeline-shaped folder as diffusers' save_pretrained lays it out."""
  torch_model("flux2-klein-2ref").save_pretrained(str(root / "transformer"))
  torch_vae("flux2").save_pretrained(str(root / "vae"))
  FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(root / "scheduler"))
  index = {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1",
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
           "text_encoder": [None, None], "tokenizer": [None, None], **(extra or {})}
  if text_encoder:
    text_ref.torch_model("qwen3-causal-lm").save_pretrained(str(root / "text_encoder"))
    save_tokenizer(root / "tokenizer")
    index.update(text_encoder=["transformers", "Qwen3ForCausalLM"], tokenizer=["transformers", "Qwen2TokenizerFast"])
  (root / "model_index.json").write_text(json.dumps(index))


def test_every_component_converts_and_equals_torch(tmp_path, capsys):
  root, out = tmp_path / "pipe", tmp_path / "out"
  write_pipeline(root, extra={"image_encoder": ["transformers", "SiglipVisionModel"]})
  (root / "image_encoder").mkdir()
  assert main(["convert", str(root), str(out)]) == 0
  printed = capsys.readouterr().out
  assert "Flux2KleinPipeline" in printed and "image_encoder" in printed and "SiglipVisionModel" in printed
  for part in ("transformer", "vae", "text_encoder"):   # progress off a terminal: plain lines, one at the end
    assert re.search(rf"^convert {part}: 100% .* tensors=(\d+)/\1$", printed, re.M), printed

  parts = pipeline_components(out)
  assert set(parts) == {"transformer", "vae", "text_encoder"}
  index = json.loads((out / "pipeline.json").read_text())
  assert index["pipeline"] == "Flux2KleinPipeline" and sorted(index["copied"]) == ["scheduler", "tokenizer"]
  assert index["components"] == {"transformer": "transformer", "vae": "vae", "text_encoder": "text-decoder"}
  assert set(index["skipped"]) == {"image_encoder"}
  assert (out / "scheduler" / "scheduler_config.json").is_file()
  assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "text_encoder" / "tokenizer").is_dir()

  tm = torch_model("flux2-klein-2ref")
  cfg = ref.config_of(tm)
  for model in (load_model(out), load(parts["transformer"])):   # the pipeline folder, or its component
    got, want = model_params(model), params_from_state_dict(cfg, ref.state_dict(tm))
    assert all(np.array_equal(got[k], want[k]) for k in want)
  got, want = nnx.to_flat_state(nnx.state(load_vae(out))), nnx.to_flat_state(nnx.state(jax_vae("flux2")))
  for (p, x), (_, y) in zip(got, want):
    assert np.array_equal(x[...], y[...]), p
  ids, mask = text_ref.prompts((9, 5), 9, seed=3)
  with torch.no_grad():
    want = text_ref.torch_model("qwen3-causal-lm")(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(
        mask), output_hidden_states=True).hidden_states
  got = load_text_encoder(out)(jnp.asarray(ids), jnp.asarray(mask))   # every hidden state
  assert len(got) == len(want) and max(text_ref.rel_err(g, w.numpy()) for g, w in zip(got, want)) <= 1e-5


def test_transformer_and_vae_only_in_bfloat16(tmp_path):
  root, out = tmp_path / "pipe", tmp_path / "out"
  write_pipeline(root, text_encoder=False)
  report = convert_pipeline(root, out, dtype="bfloat16")
  assert set(report.converted) == {"transformer", "vae"} and report.copied == ["scheduler"]
  assert not report.skipped   # text_encoder / tokenizer are [null, null]: absent, nothing to say
  model = load_model(out, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in model_params(model).values())
  with pytest.raises(CheckpointError, match="no text encoder component"):
    load_text_encoder(out)


def test_a_bad_component_leaves_nothing(tmp_path):
  root, out = tmp_path / "pipe", tmp_path / "out"
  write_pipeline(root, text_encoder=False)
  (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"garbage!")
  with pytest.raises(CheckpointError, match="vae"):
    convert_pipeline(root, out)
  assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
  assert main(["convert", str(root), str(out)]) == 2 and not out.exists()


def test_pipeline_errors(tmp_path):
  root = tmp_path / "pipe"
  root.mkdir()
  (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                     "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
  with pytest.raises(CheckpointError, match="names no component this converter knows"):
    convert_pipeline(root, tmp_path / "out")
  write_pipeline(root, text_encoder=False)
  with pytest.raises(CheckpointError, match="--text-layers applies to Qwen3 / Mistral"):
    convert_pipeline(root, tmp_path / "out", text_layers=2)
  with pytest.raises(CheckpointError, match="not a converted pipeline"):
    pipeline_components(root)
  assert not (tmp_path / "out").exists()


def test_flux1_pipeline_with_clip_and_t5(tmp_path):
  root, out = tmp_path / "pipe", tmp_path / "out"
  torch_model("flux1-kontext").save_pretrained(str(root / "transformer"))
  torch_vae("flux1").save_pretrained(str(root / "vae"))
  for encoder, name in (("text_encoder", "clip-legacy-eos"), ("text_encoder_2", "t5-v1_1")):
    text_ref.torch_model(name).save_pretrained(str(root / encoder))
    save_tokenizer(root / encoder.replace("text_encoder", "tokenizer"))
  (root / "model_index.json").write_text(json.dumps({
      "_class_name": "FluxKontextPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
      "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
      "tokenizer_2": ["transformers", "T5TokenizerFast"], "image_encoder": [None, None]}))
  report = convert_pipeline(root, out)
  assert report.pipeline == "FluxKontextPipeline" and sorted(report.copied) == ["tokenizer", "tokenizer_2"]
  kinds = json.loads((out / "pipeline.json").read_text())["components"]
  assert kinds == {"transformer": "transformer", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "t5"}
  assert (out / "text_encoder_2" / "tokenizer" / "tokenizer.json").is_file()
  with pytest.raises(CheckpointError, match="several text encoder component"):
    load_text_encoder(out)
  ids, mask = text_ref.prompts((9, 5), 9, seed=4)
  with torch.no_grad():
    want = text_ref.torch_model("t5-v1_1")(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  got = load_text_encoder(pipeline_components(out)["text_encoder_2"])(jnp.asarray(ids), jnp.asarray(mask))
  assert text_ref.rel_err(got, want.last_hidden_state.numpy()) <= 1e-5
  assert model_params(load_model(out)).keys() == params_from_state_dict(
      ref.config_of(torch_model("flux1-kontext")), ref.state_dict(torch_model("flux1-kontext"))).keys()


def test_a_klein_kv_pipeline_converts_to_a_kv_model_and_exports_as_one(tmp_path):
  from sparse_context_jax.convert import convert_checkpoint, export_checkpoint
  from sparse_context_jax.convert.checkpoint import read_config
  from sparse_context_jax.convert.safetensors_io import SafetensorsFile
  root, out = tmp_path / "pipe", tmp_path / "out"
  write_pipeline(root, text_encoder=False)
  convert_pipeline(root, tmp_path / "plain")   # the same folder named Flux2KleinPipeline: a joint model
  assert read_config(tmp_path / "plain" / "transformer").reference_attention == "joint"
  index = json.loads((root / "model_index.json").read_text())
  (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2KleinKVPipeline"}))
  convert_pipeline(root, out)
  cfg = read_config(out / "transformer")
  assert cfg.reference_attention == "kv" and load_model(out).config == cfg
  assert cfg.replace(reference_attention="joint") == read_config(tmp_path / "plain" / "transformer")
  want = model_params(load_model(out))
  # export keeps the KV config (safetensors metadata), convert reads it back; the tiny test shapes are no released
  # architecture, so the file sits beside the diffusers config.json (which cannot say "kv")
  for layout in ("bfl", "diffusers"):
    (tmp_path / layout).mkdir()
    (tmp_path / layout / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    file = tmp_path / layout / "model.safetensors"
    export_checkpoint(out / "transformer", file, layout=layout)
    f = SafetensorsFile(file)
    assert f.metadata == {"format": "pt", "reference_attention": "kv"}
    f.close()
    assert convert_checkpoint(tmp_path / layout, tmp_path / f"back-{layout}") == cfg
    got = model_params(load_model(tmp_path / f"back-{layout}"))
    assert all(np.array_equal(got[k], want[k]) for k in want)
  export_checkpoint(tmp_path / "plain" / "transformer", tmp_path / "bfl" / "model.safetensors", layout="bfl",
                    force=True)
  assert convert_checkpoint(tmp_path / "bfl", tmp_path / "back-plain").reference_attention == "joint"
