"""LoRA files in (`convert/lora_in.py`): files written by peft / diffusers, kohya and BFL-named files merged into our
tiny FLUX.1 / FLUX.2 models give the forward of diffusers' `load_lora_weights` with the same file (<= 1e-5);
scales add up, scale 0 is the base; bad files are one line each and change no weight; `load_model(lora=)` and
`generate --lora`."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.loaders import Flux2LoraLoaderMixin, FluxLoraLoaderMixin
from flax import nnx
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save_file

import reference as ref
from sparse_context_jax import cli
from sparse_context_jax.convert import CheckpointError, load_model, load_state_dict, model_params, save
from sparse_context_jax.convert import lora_in
from sparse_context_jax.convert.lora_in import merge_loras
from sparse_context_jax.model.mmdit import MMDiT

PEFT = {
    "flux1": dict(r=4, lora_alpha=6.0, rank_pattern={"to_k": 2, "single_transformer_blocks.0.proj_out": 5},
                  alpha_pattern={"proj_mlp": 3.0},
                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "proj_mlp",
                                  "proj_out", "norm_out.linear", "ff.net.0.proj", "ff_context.net.2", "x_embedder",
                                  "norm1.linear", "norm.linear"]),
    "flux2": dict(r=4, lora_alpha=5.0, use_rslora=True, rank_pattern={"to_qkv_mlp_proj": 3},
                  target_modules=["to_q", "to_v", "add_q_proj", "to_add_out", "to_out.0", "to_qkv_mlp_proj",
                                  "single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out",
                                  "linear_in", "linear_out", "norm_out.linear", "x_embedder",
                                  "double_stream_modulation_img.linear", "single_stream_modulation.linear"]),
}


class _Flux1(FluxLoraLoaderMixin):   # the pipeline attributes `load_lora_weights` reads, around a transformer
  hf_device_map, components, text_encoder = None, {}, None

  def __init__(self, transformer):
    self.transformer = transformer


class _Flux2(Flux2LoraLoaderMixin):
  hf_device_map, components = None, {}

  def __init__(self, transformer):
    self.transformer = transformer


def _tiny(family):
  return ref.tiny_flux1() if family == "flux1" else ref.tiny_flux2()


def _diffusers(tm, files):
  """A copy of `tm` with diffusers' `load_lora_weights` of each (file, scale)."""
  holder = (_Flux1 if ref.config_of(tm).family == "flux1" else _Flux2)(copy.deepcopy(tm))
  names = [f"a{i}" for i in range(len(files))]
  for name, (f, _) in zip(names, files):
    holder.load_lora_weights(str(f), adapter_name=name)
  holder.transformer.set_adapters(names, weights=[s for _, s in files])
  return holder.transformer


def _ours(tm, files=()):
  model = load_state_dict(MMDiT(ref.config_of(tm), rngs=nnx.Rngs(0)), ref.state_dict(tm))
  merge_loras(model, files)
  return model


def _forward(model, x):
  return np.asarray(model(**{k: jnp.asarray(v) for k, v in x.items()}))


def _peft_file(tm, path, seed=0):
  """A LoRA trained-looking file written the way diffusers trainers write it: peft's adapter on the diffusers
  model, random nonzero B, `get_peft_model_state_dict` and `save_lora_weights` (with the adapter metadata);
  returns the adapted model (peft's own forward)."""
  family = ref.config_of(tm).family
  adapted = copy.deepcopy(tm)
  config = LoraConfig(**PEFT[family])
  adapted.add_adapter(config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in adapted.named_parameters():
      if "lora_" in n:
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in n else 1 / np.sqrt(p.shape[1])))
  FluxPipeline.save_lora_weights(path.parent, weight_name=path.name,
                                 transformer_lora_layers=get_peft_model_state_dict(adapted),
                                 transformer_lora_adapter_metadata=config.to_dict())
  return adapted


def _factors(rng, rank, out, cols):
  return (rng.standard_normal((rank, cols)).astype(np.float32) / np.sqrt(cols),
          0.3 * rng.standard_normal((out, rank)).astype(np.float32))


def _write(path, modules: dict, *, down_up=False, alphas=None):
  """{key prefix: (A, B)} -> a safetensors file of lora_A/lora_B (or lora_down/lora_up) and `.alpha`s."""
  a_name, b_name = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
  tensors = {}
  for k, (A, B) in modules.items():
    tensors[f"{k}.{a_name}.weight"], tensors[f"{k}.{b_name}.weight"] = A, B
    if alphas and k in alphas:
      tensors[f"{k}.alpha"] = np.asarray(alphas[k], np.float32)
  save_file(tensors, str(path))
  return path


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_peft_written_file_matches_diffusers_load_lora_weights(tmp_path, family):
  tm = _tiny(family)
  x = ref.make_inputs(ref.config_of(tm))
  f = tmp_path / "lora.safetensors"
  adapted = _peft_file(tm, f)
  want = ref.torch_forward(_diffusers(tm, [(f, 1.0)]), x)
  assert ref.rel_err(ref.torch_forward(adapted, x), want) <= 1e-6   # the file holds peft's adapter
  assert ref.rel_err(ref.torch_forward(tm, x), want) > 1e-2         # the LoRA matters
  got = _forward(_ours(tm, [(f, 1.0)]), x)
  assert ref.rel_err(got, want) <= 1e-5, ref.rel_err(got, want)


def _bfl_modules(cfg, rng, prefix):
  """BFL-named factors of a tiny model: fused q/k/v, attention output, MLPs, single blocks' linear2."""
  names = [f"double_blocks.{i}.{m}" for i in range(cfg.depth_double)
           for m in ("img_attn.qkv", "txt_attn.proj", "img_mlp.0", "txt_mlp.2")]
  names += [f"single_blocks.{i}.linear2" for i in range(cfg.depth_single)]
  return {prefix + n: _factors(rng, 2 + i % 3, *_weight_shape(cfg, n)) for i, n in enumerate(names)}


def _weight_shape(cfg, torch_name):
  """(out, in) of a torch Linear of the converter's key tables."""
  return lora_in._names(cfg)[2][torch_name].shape


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_bfl_named_flux2_file_matches_diffusers(tmp_path, prefix):
  tm = ref.tiny_flux2()
  cfg = ref.config_of(tm)
  x = ref.make_inputs(cfg)
  rng = np.random.default_rng(0)
  m = _bfl_modules(cfg, rng, prefix)
  for i in range(cfg.depth_single):
    m[f"{prefix}single_blocks.{i}.linear1"] = _factors(rng, 4, 3 * cfg.hidden_size + cfg.mlp_in_features,
                                                       cfg.hidden_size)
  m[f"{prefix}img_in"] = _factors(rng, 2, cfg.hidden_size, cfg.in_channels)
  f = _write(tmp_path / "bfl.safetensors", m)
  want = ref.torch_forward(_diffusers(tm, [(f, 1.0)]), x)
  assert ref.rel_err(_forward(_ours(tm, [(f, 1.0)]), x), want) <= 1e-5
  if prefix == "diffusion_model.":
    # diffusers' FLUX.2 BFL reader maps the final layer's adaLN without swapping BFL's (shift, scale) rows into its
    # (scale, shift): ours swaps them, as a diffusers-named file with the rows swapped does in diffusers
    D = cfg.hidden_size
    A, B = _factors(rng, 2, 2 * D, D)
    f = _write(tmp_path / "final.safetensors", {"diffusion_model.final_layer.adaLN_modulation.1": (A, B)})
    swapped = _write(tmp_path / "final_diffusers.safetensors",
                     {"transformer.norm_out.linear": (A, np.concatenate([B[D:], B[:D]]))})
    want = ref.torch_forward(_diffusers(tm, [(swapped, 1.0)]), x)
    assert ref.rel_err(ref.torch_forward(_diffusers(tm, [(f, 1.0)]), x), want) > 1e-3   # diffusers' reading
    assert ref.rel_err(_forward(_ours(tm, [(f, 1.0)]), x), want) <= 1e-5


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_kohya_file_matches_diffusers(tmp_path, family):
  tm = _tiny(family)
  cfg = ref.config_of(tm)
  x = ref.make_inputs(cfg)
  rng = np.random.default_rng(1)
  m = {k.replace(".", "_"): v for k, v in _bfl_modules(cfg, rng, "lora_unet.").items()}
  if family == "flux2":   # diffusers' FLUX.1 kohya reader splits linear1 at FLUX.1-dev's sizes only
    m["lora_unet_single_blocks_1_linear1"] = _factors(rng, 4, 3 * cfg.hidden_size + cfg.mlp_in_features,
                                                      cfg.hidden_size)
    m["lora_unet_img_in"] = _factors(rng, 2, cfg.hidden_size, cfg.in_channels)
  else:
    m["lora_unet_double_blocks_1_img_mod_lin"] = _factors(rng, 2, 6 * cfg.hidden_size, cfg.hidden_size)
  alphas = {k: 1.5 * (i + 1) for i, k in enumerate(m) if i % 2 == 0}
  f = _write(tmp_path / "kohya.safetensors", m, down_up=True, alphas=alphas)
  want = ref.torch_forward(_diffusers(tm, [(f, 1.0)]), x)
  assert ref.rel_err(_forward(_ours(tm, [(f, 1.0)]), x), want) <= 1e-5
  if family == "flux1":
    # diffusers' FLUX.1 kohya reader drops the final layer's LoRA (its names lack `transformer.`): ours applies it,
    # BFL's (shift, scale) rows swapped into diffusers' (scale, shift), as a diffusers-named file does in diffusers
    A, B = _factors(rng, 2, 2 * cfg.hidden_size, cfg.hidden_size)
    f = _write(tmp_path / "final.safetensors", {"lora_unet_final_layer_adaLN_modulation_1": (A, B)}, down_up=True,
               alphas={"lora_unet_final_layer_adaLN_modulation_1": 3.0})
    swapped = _write(tmp_path / "final_diffusers.safetensors", {"transformer.norm_out.linear": (
        A, 1.5 * np.concatenate([B[cfg.hidden_size:], B[:cfg.hidden_size]]))})
    want = ref.torch_forward(_diffusers(tm, [(swapped, 1.0)]), x)
    assert ref.rel_err(want, ref.torch_forward(tm, x)) > 1e-3
    assert ref.rel_err(_forward(_ours(tm, [(f, 1.0)]), x), want) <= 1e-5


def test_two_loras_add_up_with_their_scales_and_scale_zero_is_the_base(tmp_path):
  tm = ref.tiny_flux1()
  x = ref.make_inputs(ref.config_of(tm))
  f1 = tmp_path / "a.safetensors"
  _peft_file(tm, f1)
  m = {k.replace(".", "_"): v for k, v in _bfl_modules(ref.config_of(tm), np.random.default_rng(2),
                                                        "lora_unet.").items()}
  f2 = _write(tmp_path / "b.safetensors", m, down_up=True, alphas={k: 2.0 for k in m})
  files = [(f1, 0.6), (f2, -1.3)]
  want = ref.torch_forward(_diffusers(tm, files), x)
  assert ref.rel_err(_forward(_ours(tm, files), x), want) <= 1e-5
  base = model_params(_ours(tm))
  zero = model_params(_ours(tm, [(f1, 0.0), (f2, 0.0)]))
  assert all(np.array_equal(base[k], zero[k]) for k in base)


def _bad_files(tmp_path):
  cfg = ref.config_of(ref.tiny_flux1())
  rng = np.random.default_rng(3)
  D = cfg.hidden_size
  ok = {"transformer.transformer_blocks.0.attn.to_q": _factors(rng, 2, D, D)}
  big = {"transformer.transformer_blocks.0.attn.to_q": _factors(rng, 2, 2 * D, 2 * D)}
  bad_rank = {"transformer.transformer_blocks.0.attn.to_k": (_factors(rng, 2, D, D)[0], _factors(rng, 3, D, D)[1])}
  unknown = {**ok, "transformer.transformer_blocks.0.attn.to_banana": _factors(rng, 2, D, D)}
  flux2 = {"diffusion_model.single_blocks.0.linear1": _factors(rng, 2, 9 * D, D)}
  good = _write(tmp_path / "good.safetensors", ok)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(good.read_bytes()[:-40])
  unpaired = tmp_path / "unpaired.safetensors"
  save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": ok[next(iter(ok))][0]}, str(unpaired))
  return good, {
      "another model": (_write(tmp_path / "big.safetensors", big), "a LoRA for another model"),
      "another family": (_write(tmp_path / "flux2.safetensors", flux2), "another model"),
      "unknown keys": (_write(tmp_path / "unknown.safetensors", unknown), "to_banana.lora_A.weight"),
      "rank mismatch": (_write(tmp_path / "rank.safetensors", bad_rank), "rank mismatch"),
      "truncated": (truncated, "truncated"),
      "unpaired": (unpaired, "without their lora_A / lora_B pair"),
      "missing": (tmp_path / "nope.safetensors", "does not exist"),
  }


def test_bad_files_are_one_line_each_and_merge_nothing(tmp_path):
  tm = ref.tiny_flux1()
  good, cases = _bad_files(tmp_path)
  model = _ours(tm)
  before = model_params(model)
  for what, (path, needle) in cases.items():
    with pytest.raises(CheckpointError) as e:
      merge_loras(model, [(good, 1.0), (path, 1.0)])   # the good file first: still nothing merged
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(path) in msg, (what, msg)
  after = model_params(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  merge_loras(model, [(good, 1.0)])
  assert not np.array_equal(model_params(model)["double_blocks.img_attn.qkv.kernel"],
                            before["double_blocks.img_attn.qkv.kernel"])


def test_load_model_merges_lora_files(tmp_path):
  tm = ref.tiny_flux2()
  x = ref.make_inputs(ref.config_of(tm))
  f = tmp_path / "lora.safetensors"
  _peft_file(tm, f)
  save(_ours(tm), tmp_path / "model")
  want = _forward(_ours(tm, [(f, 0.7)]), x)
  got = _forward(load_model(tmp_path / "model", lora=[(f, 0.7)]), x)
  assert ref.rel_err(got, want) <= 1e-6
  with pytest.raises(CheckpointError, match="does not exist"):
    load_model(tmp_path / "model", lora=[(tmp_path / "nope.safetensors", 1.0)])


def test_generate_with_lora_writes_pngs_and_reports_the_lora(tmp_path):
  from test_generate import MODEL, _world
  jobs = _world(tmp_path, 2)
  save(MMDiT(MODEL, rngs=nnx.Rngs(0)), tmp_path / "model")
  rng = np.random.default_rng(4)
  D = MODEL.hidden_size
  f = _write(tmp_path / "lora.safetensors", {
      "diffusion_model.double_blocks.0.img_attn.qkv": _factors(rng, 2, 3 * D, D),
      "diffusion_model.single_blocks.0.linear1": _factors(rng, 2, 3 * D + MODEL.mlp_in_features, D)})
  base = ["generate", str(jobs), "--model", str(tmp_path / "model"), "--random-vae", str(tmp_path / "vae.json"),
          "--save-latents", "--force"]
  assert cli.main(base) == 0
  plain = np.load(tmp_path / "out/0.npy")
  assert cli.main(base + ["--lora", f"{f}:0.5", "--lora", str(f)]) == 0
  report = json.loads((tmp_path / "jobs.report.json").read_text())
  assert [(l["file"], l["scale"], l["modules"]) for l in report["lora"]] == [(str(f), 0.5, 2), (str(f), 1.0, 2)]
  assert len(report["jobs"]) == 2 and all((tmp_path / f"out/{i}.png").is_file() for i in range(2))
  assert not np.allclose(np.load(tmp_path / "out/0.npy"), plain)
  assert cli.main(base + ["--lora", str(tmp_path / "nope.safetensors")]) == 2
