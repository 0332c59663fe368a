"""Prompt embeddings as diffusers' FLUX pipelines build them: tokenization, encoders, text ids, truncation."""

from __future__ import annotations

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
