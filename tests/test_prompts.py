"""Prompt embeddings as diffusers' FLUX pipelines build them: tokenization, encoders, text ids, truncation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

import prompt_reference as pr
from sparse_context_jax.encoders.recipes import RECIPES, check_prompts, tokenize
from sparse_context_jax.encoders.tiny_tokenizers import KINDS, save_tiny_tokenizer

LONG = "a large old house by the river under a bright blue sky, detailed painting, " * 8
PROMPTS = ["a photo of a cat", "", "A Dog [IMG] jumps over the lazy fox at the beach!", LONG]
# Long enough for all but LONG (FLUX.2 dev's system turn alone is 143 tiny tokens).
MSL = {"flux1": 32, "flux2-klein": 64, "flux2-dev": 200}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def reference(request):
  name = request.param
  return name, pr.encode(pr.reference_pipeline(name), PROMPTS, MSL[name])


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_tokenizers_load_with_auto_tokenizer(tmp_path, kind):
  path = save_tiny_tokenizer(kind, tmp_path / kind)
  tok = AutoTokenizer.from_pretrained(path)
  assert type(tok).__name__ == type(pr.tokenizer(kind)).__name__
  assert tok("a photo of a cat").input_ids == pr.tokenizer(kind)("a photo of a cat").input_ids
  assert tok.decode(tok("a photo", add_special_tokens=False).input_ids).strip() == ("a photo")
  assert len(tok) < 700 and tok.pad_token is not None


def test_tiny_qwen3_template_is_qwen3s():
  tok = pr.tokenizer("qwen3")
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True,
                                 enable_thinking=False)
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
  ids = tok(text).input_ids
  for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
    assert tok.convert_tokens_to_ids(t) in ids   # split out before BPE
  assert tok.convert_tokens_to_ids("<|endoftext|>") == tok.pad_token_id


def test_tokens_equal_what_diffusers_feeds_its_encoders(reference):
  name, (_, fed) = reference
  for stream in RECIPES[name].streams:
    tokens = tokenize(stream, pr.tokenizer(stream.kinds[0]), PROMPTS, MSL[name])
    ids, mask = fed[stream.component]
    np.testing.assert_array_equal(tokens.input_ids, ids)
    if mask is not None:
      np.testing.assert_array_equal(tokens.attention_mask, mask)
    assert stream.attention_mask == (mask is not None)
    assert tokens.truncated == (False, False, False, True)


def test_clip_pads_to_77_whatever_the_sequence_length():
  clip = RECIPES["flux1"].streams[0]
  for msl in (8, 300):
    assert tokenize(clip, pr.tokenizer("clip"), ["a cat"], msl).input_ids.shape == (1, 77)


def test_prompts_must_be_strings():
  with pytest.raises(TypeError, match="prompt 1 is a int"):
    check_prompts(["a cat", 3])
  with pytest.raises(TypeError, match="list of strings"):
    check_prompts("a cat")
  with pytest.raises(ValueError, match="no prompts"):
    check_prompts([])


# ---- Encoders: converted from the torch references, equal to diffusers' encode_prompt -------------------------------

def converted(tmp_path, pipe, component: str, kind: str):
  """The pipeline's torch encoder and its tokenizer saved as transformers does, then converted (the tokenizer goes
  to OUT/tokenizer)."""
  from sparse_context_jax.convert import convert_checkpoint
  src, out = tmp_path / f"src-{component}", tmp_path / f"out-{component}"
  getattr(pipe, component).save_pretrained(src)
  pr.tokenizer(kind).save_pretrained(src)
  convert_checkpoint(src, out, progress=False)
  assert (out / "tokenizer").is_dir()
  return out


def rel_err(got, expected) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30))


@pytest.fixture(scope="module")
def loaded(reference, tmp_path_factory):
  from sparse_context_jax import load_prompt_encoder
  name, _ = reference
  pipe, tmp = pr.reference_pipeline(name), tmp_path_factory.mktemp(name)
  folders = [converted(tmp, pipe, s.component, s.kinds[0]) for s in RECIPES[name].streams]
  return load_prompt_encoder(*reversed(folders))   # FLUX.1: T5 first, CLIP second; either order works


def test_embeddings_equal_diffusers_encode_prompt(reference, loaded):
  name, (want, _) = reference
  emb = loaded(PROMPTS, max_sequence_length=MSL[name])
  assert emb.txt.dtype == np.float32 and emb.txt.shape == want["txt"].shape
  assert rel_err(emb.txt, want["txt"]) <= 1e-5
  np.testing.assert_array_equal(emb.txt_ids, want["txt_ids"])
  assert emb.txt_ids.shape == ((MSL[name], 3) if name == "flux1" else (len(PROMPTS), MSL[name], 4))
  if want["y"] is None:
    assert emb.y is None
  else:
    assert emb.y.dtype == np.float32 and rel_err(emb.y, want["y"]) <= 1e-5
  assert emb.truncated == (False, False, False, True)
  # each prompt alone gives its row of the batch: nothing leaks between prompts
  one = loaded(PROMPTS[2:3], max_sequence_length=MSL[name])
  assert rel_err(one.txt[0], want["txt"][2]) <= 1e-5


def test_a_new_prompt_never_recompiles(reference, loaded):
  name, _ = reference
  before, msl = loaded.programs.count, MSL[name] + 3   # a length no other test used
  for prompts in (["a red house", "x", "y", "z"], ["snow", "rain", "sun", LONG]):
    loaded(prompts, max_sequence_length=msl)
  assert loaded.programs.count == before + 1
  loaded(["a red house"], max_sequence_length=msl)   # another batch size: one more program
  assert loaded.programs.count == before + 2


def test_bfloat16_encoders_give_float32_embeddings_close_to_diffusers(tmp_path):
  import jax.numpy as jnp

  from sparse_context_jax import load_prompt_encoder
  pipe = pr.reference_pipeline("flux2-klein")
  enc = load_prompt_encoder(converted(tmp_path, pipe, "text_encoder", "qwen3"), dtype=jnp.bfloat16)
  want, _ = pr.encode(pipe, PROMPTS[:2], 40)
  emb = enc(PROMPTS[:2], max_sequence_length=40)
  assert emb.txt.dtype == np.float32 and 1e-5 < rel_err(emb.txt, want["txt"]) < 0.1


def test_a_converted_pipeline_folder(tmp_path):
  """OUT/text_encoder(_2) beside OUT/tokenizer(_2), as `convert` writes a diffusers pipeline."""
  from sparse_context_jax import load_prompt_encoder
  pipe = pr.reference_pipeline("flux1")
  root = tmp_path / "pipeline"
  for s, tok in zip(RECIPES["flux1"].streams, ("tokenizer", "tokenizer_2")):
    out = converted(tmp_path, pipe, s.component, s.kinds[0])
    (root / tok).mkdir(parents=True)
    pr.tokenizer(s.kinds[0]).save_pretrained(root / tok)
    (root / s.component).mkdir()
    for f in out.iterdir():
      if f.name in ("config.json", "params"):
        f.rename(root / s.component / f.name)
  enc = load_prompt_encoder(root)
  want, _ = pr.encode(pipe, PROMPTS[:2], 8)
  emb = enc(PROMPTS[:2], max_sequence_length=8)
  assert rel_err(emb.txt, want["txt"]) <= 1e-5 and rel_err(emb.y, want["y"]) <= 1e-5


# ---- Random encoders (generate --random-text-encoder) ----------------------------------------------------------------

def _cfg(name: str, context: int, pooled: int = 0):
  from sparse_context_jax import preset
  return dataclasses.replace(preset(name), context_dim=context, pooled_dim=pooled)


@pytest.mark.parametrize("name,kind", [("flux2-klein-4b", "qwen3"), ("flux2-dev", "mistral"), ("flux1-dev", "t5")])
def test_random_encoder_matches_the_transformer(name, kind):
  from sparse_context_jax.encoders.prompts import random_prompt_encoder, text_kind
  cfg = _cfg(name, 48, 24 if name.startswith("flux1") else 0)
  enc = random_prompt_encoder(cfg, seed=0)
  assert kind in {text_kind(c) for c in enc.configs.values()}
  emb = enc(["a cat", "", LONG * 3], max_sequence_length=200)
  assert emb.txt.shape == (3, 200, 48) and np.isfinite(emb.txt).all() and emb.txt.std() > 0.1
  assert (emb.y is None) == (cfg.pooled_dim == 0) and (emb.y is None or emb.y.shape == (3, 24))
  assert emb.truncated == (False, False, True)
  again = random_prompt_encoder(cfg, seed=0)(["a cat"], max_sequence_length=200)
  np.testing.assert_allclose(again.txt[0], emb.txt[0], atol=1e-5)   # deterministic in the seed
  assert not np.allclose(emb.txt[0], emb.txt[1])


def test_random_encoder_of_a_full_size_preset_is_small():
  from sparse_context_jax import preset
  from sparse_context_jax.encoders.prompts import random_prompt_encoder
  cfg = preset("flux2-klein-4b")
  enc = random_prompt_encoder(cfg, seed=1)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(enc.state))
  assert n < 5_000_000
  assert enc(["a cat"], max_sequence_length=8).txt.shape == (1, 8, cfg.context_dim)


def test_random_encoder_refuses_a_context_it_cannot_give():
  from sparse_context_jax.encoders.prompts import random_prompt_encoder
  with pytest.raises(ValueError, match="not 3 x"):
    random_prompt_encoder(_cfg("flux2-klein-4b", 50), seed=0)


# ---- Errors a user can cause -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory):
  """A small random Qwen3 saved as `convert` writes it, without a tokenizer."""
  from sparse_context_jax.convert import save
  from sparse_context_jax.encoders.random_text import random_parts
  _, encoders, _ = random_parts(_cfg("flux2-klein-4b", 48), seed=0)
  out = tmp_path_factory.mktemp("qwen3") / "enc"
  save(encoders["text_encoder"], out)
  return out


def test_missing_tokenizer_is_named(saved_qwen3):
  from sparse_context_jax import load_prompt_encoder
  with pytest.raises(ValueError, match="no tokenizer for the text encoder .*enc"):
    load_prompt_encoder(saved_qwen3)


def test_tokenizer_of_another_vocabulary(saved_qwen3, tmp_path):
  from sparse_context_jax import load_prompt_encoder
  pipe = tmp_path / "pipe"
  pipe.mkdir()
  (pipe / "text_encoder").symlink_to(saved_qwen3, target_is_directory=True)
  save_tiny_tokenizer("clip", pipe / "tokenizer", vocab_size=700)
  with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the text encoder's vocab_size is"):
    load_prompt_encoder(pipe)


def test_a_prompt_that_is_not_a_string():
  from sparse_context_jax.encoders.prompts import random_prompt_encoder
  enc = random_prompt_encoder(_cfg("flux2-klein-4b", 48), seed=0)
  with pytest.raises(TypeError, match="prompt 1 is a bytes"):
    enc(["a cat", b"a dog"])
  with pytest.raises(TypeError, match="list of strings"):
    enc("a cat")
  assert enc.programs.count == 0


def test_an_encoder_without_the_layers_the_recipe_reads(saved_qwen3, tmp_path):
  from sparse_context_jax import load_prompt_encoder
  save_tiny_tokenizer("qwen3", tmp_path / "tokenizer")
  (tmp_path / "text_encoder").symlink_to(saved_qwen3, target_is_directory=True)
  with pytest.raises(ValueError, match=r"reads hidden states \(9, 18, 27\) but .* runs 3 layers"):
    load_prompt_encoder(tmp_path)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "transformer", "two-qwen3", "none"])
def test_unsupported_folders(case, saved_qwen3, tmp_path):
  from sparse_context_jax import load_prompt_encoder
  from sparse_context_jax.errors import CheckpointError
  args, match = {
      "missing": ([tmp_path / "nope"], "does not exist"),
      "file": ([tmp_path / "f.txt"], "is not a folder"),
      "empty": ([tmp_path], "is not a converted checkpoint"),
      "transformer": ([tmp_path / "mmdit"], "is a converted .*, not a text encoder"),
      "two-qwen3": ([tmp_path / "pipe", tmp_path / "pipe"], "make no FLUX pipeline"),
      "none": ([], "no text encoder folder given"),
  }[case]
  (tmp_path / "f.txt").write_text("x")
  if case == "transformer":
    from flax import nnx

    from sparse_context_jax import MMDiT
    from sparse_context_jax.convert import save
    cfg = dataclasses.replace(_cfg("flux2-klein-4b", 48), num_heads=1, head_dim=16, axes_dims=(4, 4, 4, 4),
                              depth_double=1, depth_single=1, in_channels=8, out_channels=8)
    save(MMDiT(cfg, rngs=nnx.Rngs(0)), tmp_path / "mmdit")
  if case == "two-qwen3":
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "text_encoder").symlink_to(saved_qwen3, target_is_directory=True)
    save_tiny_tokenizer("qwen3", tmp_path / "pipe" / "tokenizer")
  with pytest.raises((ValueError, CheckpointError), match=match):
    load_prompt_encoder(*args)


def test_the_dev_system_message_is_diffusers():
  from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

  from sparse_context_jax.encoders.recipes import FLUX2_SYSTEM_MESSAGE
  assert FLUX2_SYSTEM_MESSAGE == SYSTEM_MESSAGE


# ---- On a mesh, and in `generate` --------------------------------------------------------------------------------

MESH_SCRIPT = """
import sys
import jax, numpy as np
from sparse_context_jax import load_prompt_encoder
prompts = ["a cat", "", "a red house by the river"]
one = load_prompt_encoder(sys.argv[1])(prompts, max_sequence_length=40)
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
enc = load_prompt_encoder(sys.argv[1], mesh=mesh)
assert len(enc.state["text_encoder"]["embed"]["embedding"][...].sharding.device_set) == 4
sharded = enc(prompts, max_sequence_length=40)
print("maxdiff", float(np.max(np.abs(sharded.txt - one.txt))), float(np.max(np.abs(one.txt))))
"""


def test_parameters_sharded_over_a_mesh_give_the_same_embeddings(tmp_path):
  import os
  import subprocess
  import sys
  from pathlib import Path
  folder = converted(tmp_path, pr.reference_pipeline("flux2-klein"), "text_encoder", "qwen3")
  root = Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(root)}
  r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(folder)], capture_output=True, text=True, env=env,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  diff, scale = map(float, r.stdout.split("maxdiff")[1].split())
  assert diff <= 1e-5 * scale


def test_generate_with_the_random_text_encoder(tmp_path):
  import json

  import test_generate as tg
  jobs = tg._world(tmp_path, 2)
  lines = [json.loads(line) for line in jobs.read_text().splitlines()]
  for i, job in enumerate(lines):
    del job["prompt_embeds"]
    job.update(prompt="a photo of a cat " * (1 + 20 * i), negative_prompt="")
  jobs.write_text("\n".join(json.dumps(job) for job in lines) + "\n")
  r = tg._generate(jobs, "--random-text-encoder", "--max-sequence-length", "48")
  assert r.returncode == 0, r.stderr
  assert "jobs.jsonl:2: warning: prompt is longer than --max-sequence-length 48 tokens: truncated" in r.stderr
  assert "jobs.jsonl:1: warning" not in r.stderr
  report = json.loads((tmp_path / "jobs.report.json").read_text())
  assert len(report["jobs"]) == 2
