"""A string prompt to pixels with this package alone: a diffusers FLUX.2 klein pipeline folder (tiny transformer,
VAE, Qwen3 text encoder and tokenizer, random weights) -> `convert` -> `generate` with text prompts, and the same
prompts, references and noise through diffusers' `Flux2KleinPipeline` give the same final latents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

import reference as ref
from sparse_context_jax.convert.pipeline import LAST_TEXT_LAYER_READ
from sparse_context_jax.encoders.recipes import RECIPES
from sparse_context_jax.encoders.tiny_tokenizers import save_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SIZE, STEPS = 64, 3
PROMPTS = ["a red cube on a blue floor", ""]


@torch.no_grad()
def _redraw(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if p.ndim >= 2:
      p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
    elif name.endswith("bias"):
      p.copy_(0.1 * torch.randn(p.shape, generator=g))
    else:
      p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _pipeline(root: Path) -> Flux2KleinPipeline:
  """A klein pipeline folder as `save_pretrained` writes it; every weight random."""
  tokenizer = AutoTokenizer.from_pretrained(save_tiny_tokenizer("qwen3", root / "_tok"))
  text = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=1024, tie_word_embeddings=True)).eval()
  _redraw(text, 1)
  vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=8,
                           norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4).eval()
  _redraw(vae, 2)
  with torch.no_grad():
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape))
  transformer = ref.tiny_flux2(context=48, in_channels=32, seed=3)
  scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, base_image_seq_len=256,
                                              max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
  pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tokenizer,
                            transformer=transformer, is_distilled=True)
  pipe.save_pretrained(root / "klein")
  return pipe


def test_a_pipelines_text_layer_cut_is_the_last_layer_its_recipe_reads():
  assert LAST_TEXT_LAYER_READ["Flux2KleinPipeline"] == max(RECIPES["flux2-klein"].streams[0].layers)
  assert LAST_TEXT_LAYER_READ["Flux2Pipeline"] == max(RECIPES["flux2-dev"].streams[0].layers)


def _noise(seed: int, n_tokens: int, channels: int) -> np.ndarray:
  """The job's noise as `generate` draws it: (N, C) tokens from its seed."""
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n_tokens, channels), jnp.float32))


def _diffusers_latents(pipe, prompt: str, reference: Image.Image, noise: np.ndarray) -> np.ndarray:
  h = w = SIZE // 16
  latents = torch.from_numpy(noise.reshape(h, w, -1).transpose(2, 0, 1)[None].copy())
  final = {}

  def keep(_pipe, step, _t, kwargs):
    final["latents"] = kwargs["latents"].detach().numpy().copy()
    return {}

  with ref.exact_sinusoids():
    pipe(image=[reference], prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents,
         callback_on_step_end=keep, output_type="latent", max_sequence_length=64)
  return final["latents"][0]


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", *map(str, args)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
  """(the diffusers pipeline, the folder `convert` made of its saved folder)."""
  root = tmp_path_factory.mktemp("klein")
  pipe = _pipeline(root)
  r = _cli("convert", root / "klein", root / "converted")
  assert r.returncode == 0, r.stderr
  assert "keeping the 27 of 28 layers" in r.stderr
  return pipe, root / "converted"


def test_a_pipeline_folder_converts_whole_without_the_unread_layer(klein):
  _, converted = klein
  for component in ("transformer", "vae", "text_encoder"):
    assert (converted / component / "config.json").is_file(), component
  text = json.loads((converted / "text_encoder" / "config.json").read_text())
  assert (text["num_hidden_layers"], text["num_layers"]) == (28, 27)   # layer 28 is never read: not converted


def test_a_text_prompt_through_a_converted_klein_pipeline_equals_diffusers(klein, tmp_path):
  pipe, converted = klein
  rng = np.random.default_rng(0)
  reference = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
  reference.save(tmp_path / "ref.png")
  jobs = [{"prompt": p, "references": ["ref.png"], "size": [SIZE, SIZE], "steps": STEPS, "seed": i, "keep": 1.0,
           "output": f"out/{i}.png"} for i, p in enumerate(PROMPTS)]
  (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
  r = _cli("generate", tmp_path / "jobs.jsonl", "--model", converted, "--save-latents",
           "--max-sequence-length", 64, "--batch-size", 2)
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / "jobs.report.json").read_text())
  assert [j["line"] for j in report["jobs"]] == [1, 2] and not report["bad_jobs"]
  n_tokens = (SIZE // 16) ** 2
  for i, prompt in enumerate(PROMPTS):
    assert Image.open(tmp_path / "out" / f"{i}.png").size == (SIZE, SIZE)
    ours = np.load(tmp_path / "out" / f"{i}.npy")
    theirs = _diffusers_latents(pipe, prompt, reference, _noise(i, n_tokens, 32))
    assert ours.shape == theirs.shape == (n_tokens, 32)
    assert ref.rel_err(ours, theirs) <= 1e-4, (prompt, ref.rel_err(ours, theirs))


def test_encode_prompts_files_reproduce_the_text_run(klein, tmp_path):
  """`encode-prompts JOBS.jsonl OUT` then `generate OUT/jobs.jsonl` (no text encoder) == `generate` with text."""
  _, converted = klein
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(tmp_path / "ref.png")
  jobs = [{"prompt": p, "references": ["ref.png"], "size": [SIZE, SIZE], "steps": 2, "seed": i,
           "output": f"out/{i}.png"} for i, p in enumerate(PROMPTS)]
  (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
  r = _cli("encode-prompts", tmp_path / "jobs.jsonl", tmp_path / "emb", "--text-encoder", converted,
           "--max-sequence-length", 64)
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["jobs.jsonl", "line-00001.npz", "line-00002.npz"]
  text_run = _cli("generate", tmp_path / "jobs.jsonl", "--model", converted, "--save-latents",
                  "--max-sequence-length", 64)
  assert text_run.returncode == 0, text_run.stderr
  saved = {i: np.load(tmp_path / "out" / f"{i}.npy") for i in range(len(PROMPTS))}
  r = _cli("generate", tmp_path / "emb" / "jobs.jsonl", "--model", converted, "--save-latents", "--force")
  assert r.returncode == 0, r.stderr
  for i in range(len(PROMPTS)):
    np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{i}.npy"), saved[i])


def test_precompute_stores_the_text_encoders_caption_embeddings(klein, tmp_path):
  """`precompute --encoders vae:PATH,text:PATH`: each record's text_embeddings are the prompt encoder's."""
  from sparse_context_jax import load_prompt_encoder
  from sparse_context_jax.data import world, write_dataset
  from sparse_context_jax.data.precompute import Latents
  _, converted = klein
  records = world.WorldRecords(3, seed=0, size=(64, 64))
  data = write_dataset(records, tmp_path / "w", metadata=records.metadata())
  r = _cli("precompute", data, tmp_path / "lat", "--encoders", f"vae:{converted / 'vae'},text:{converted}",
           "--text-len", 32, "--resolution", 64)
  assert r.returncode == 0, r.stderr
  assert "stand-in" not in r.stderr
  latents = Latents(tmp_path / "lat")
  rows = [latents[i] for i in range(len(latents))]
  want = load_prompt_encoder(converted)([str(x["caption"]) for x in rows], max_sequence_length=32).txt
  for row, w in zip(rows, want):
    assert row["text_embeddings"].shape == (32, 48)
    assert ref.rel_err(row["text_embeddings"], w) <= 1e-5
  r = _cli("precompute", data, tmp_path / "lat2", "--encoders", f"vae:{converted / 'vae'}", "--text-dim", 48,
           "--resolution", 64)
  assert r.returncode == 0 and "hashed stand-in (local mode)" in r.stderr, r.stderr
