"""How each FLUX pipeline turns prompts into text-encoder inputs and reads the encoder's outputs, as data.

A `Recipe` is a list of `Stream`s, one per text encoder: FLUX.1 reads CLIP's pooled vector (`y`) and T5's
last hidden states (`txt`); FLUX.2 klein reads Qwen3's hidden states 9, 18 and 27 stacked per token, FLUX.2 dev
Mistral's 10, 20 and 30. `tokenize` is the one host-side tokenization of every stream (what diffusers' pipelines
feed their encoders: chat template, padding to the full length, truncation, the attention mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

# FLUX.2 dev's system turn (Black Forest Labs' `SYSTEM_MESSAGE`; diffusers' Flux2Pipeline uses the same text).
FLUX2_SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing "
                        "on object relationships, object\nattribution and actions without speculation.")


def qwen3_chat(prompt: str) -> list[dict]:
  return [{"role": "user", "content": prompt}]


def mistral_chat(prompt: str) -> list[dict]:
  # "[IMG]" is removed from the text, as the pipeline does: the processor counts image tokens.
  return [{"role": "system", "content": [{"type": "text", "text": FLUX2_SYSTEM_MESSAGE}]},
          {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]


@dataclasses.dataclass(frozen=True)
class Stream:
  """One text encoder of a pipeline and what is read from it.

  component: the pipeline's folder of the encoder ("text_encoder", "text_encoder_2"); its tokenizer is the
    matching "tokenizer", "tokenizer_2".
  kinds: the text-model kinds accepted here ("qwen3", "mistral", "t5", "clip").
  output: "txt" (per-token features) or "y" (the pooled vector).
  layers: hidden states stacked per token as [h_a | h_b | ...] (hidden_states[0] is the embedding output); () reads
    the encoder's final output (T5's last_hidden_state, CLIP's pooler_output).
  attention_mask: whether the encoder gets the padding mask (the DiT never sees one).
  chat: prompt -> the chat messages the tokenizer's template renders; None tokenizes the prompt itself.
  template_kwargs: switches of the chat template (add_generation_prompt, enable_thinking).
  fixed_length: pad to the tokenizer's own model_max_length (CLIP's 77) whatever max_sequence_length is.
  """

  component: str
  kinds: tuple[str, ...]
  output: str
  layers: tuple[int, ...] = ()
  attention_mask: bool = False
  chat: Callable[[str], list[dict]] | None = None
  template_kwargs: tuple[tuple[str, object], ...] = ()
  fixed_length: bool = False


@dataclasses.dataclass(frozen=True)
class Recipe:
  """name; streams (one per encoder); text_ids: "zeros" ((T, 3) zeros, FLUX.1) or "flux2" ((B, T, 4): t = h = w = 0,
  l = the token's index)."""

  name: str
  streams: tuple[Stream, ...]
  text_ids: str


RECIPES = {
    "flux1": Recipe("flux1", (Stream("text_encoder", ("clip",), "y", fixed_length=True),
                              Stream("text_encoder_2", ("t5",), "txt")), "zeros"),
    "flux2-klein": Recipe("flux2-klein", (Stream(
        "text_encoder", ("qwen3",), "txt", layers=(9, 18, 27), attention_mask=True, chat=qwen3_chat,
        template_kwargs=(("add_generation_prompt", True), ("enable_thinking", False))),), "flux2"),
    "flux2-dev": Recipe("flux2-dev", (Stream(
        "text_encoder", ("mistral",), "txt", layers=(10, 20, 30), attention_mask=True, chat=mistral_chat,
        template_kwargs=(("add_generation_prompt", False),)),), "flux2"),
}

RECIPE_OF_KIND = {"qwen3": "flux2-klein", "mistral": "flux2-dev", "t5": "flux1", "clip": "flux1"}


@dataclasses.dataclass(frozen=True)
class Tokens:
  """input_ids, attention_mask: (B, L) int32; truncated: per prompt, whether tokens were cut at L."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  truncated: tuple[bool, ...]


def check_prompts(prompts) -> list[str]:
  """`prompts` as a list of strings; TypeError naming the first entry that is not one (or a bare string)."""
  if isinstance(prompts, str):
    raise TypeError(f"prompts must be a list of strings, got the string {prompts[:40]!r} (wrap it in a list)")
  prompts = list(prompts)
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise TypeError(f"prompt {i} is a {type(p).__name__} ({p!r:.40}), expected a string")
  if not prompts:
    raise ValueError("no prompts to encode (expected at least one)")
  return prompts


def tokenize(stream: Stream, tokenizer, prompts: Sequence[str], max_sequence_length: int) -> Tokens:
  """The encoder inputs of `stream` for `prompts`, as the diffusers pipeline builds them: the chat template
  rendered as text (a rendering that starts with the BOS token gets no second one, the processor's rule), padded
  to the full length and truncated; L = max_sequence_length, or the tokenizer's model_max_length for a fixed-length
  stream."""
  if max_sequence_length <= 0:
    raise ValueError(f"max_sequence_length {max_sequence_length} (expected > 0)")
  length = int(tokenizer.model_max_length) if stream.fixed_length else int(max_sequence_length)
  texts = list(prompts)
  if stream.chat is not None:
    texts = [tokenizer.apply_chat_template(stream.chat(p), tokenize=False, **dict(stream.template_kwargs))
             for p in texts]
  bos = tokenizer.bos_token
  specials = not (stream.chat is not None and bos and all(t.startswith(bos) for t in texts))
  out = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=specials,
                  return_tensors="np")
  full = tokenizer(texts, add_special_tokens=specials)["input_ids"]
  return Tokens(np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32),
                tuple(len(ids) > length for ids in full))
