"""Tiny random transformers text encoders (every weight re-drawn) and their JAX twins, for the text tests."""

from __future__ import annotations

import functools

import numpy as np
import torch
import transformers as tf
from flax import nnx

from sparse_context_jax.convert import load_state_dict
from sparse_context_jax.convert.kinds import kind_of
from sparse_context_jax.text import CLIPTextEncoder, DecoderEncoder, T5Encoder, text_config_from_transformers

VOCAB = 97
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
_MISTRAL_TEXT = dict(_DECODER, model_type="mistral", rope_parameters={"rope_type": "default", "rope_theta": 1e9})
_PIXTRAL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                image_size=28, patch_size=14, model_type="pixtral")

# name -> (transformers class, config, layout of its state_dict()).
TINY = {
    "qwen3-causal-lm": (tf.Qwen3ForCausalLM, lambda: tf.Qwen3Config(
        **_DECODER, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "causal-lm"),
    "qwen3-model": (tf.Qwen3Model, lambda: tf.Qwen3Config(**dict(_DECODER, num_key_value_heads=4), attention_bias=True),
                    "base"),
    "mistral-causal-lm": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**_DECODER, sliding_window=4), "causal-lm"),
    "mistral3": (tf.Mistral3ForConditionalGeneration, lambda: tf.Mistral3Config(
        text_config=dict(_MISTRAL_TEXT, sliding_window=None), vision_config=_PIXTRAL), "mistral3"),
    "t5-v1_1": (tf.T5EncoderModel, lambda: tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=12), "t5"),
    "t5-relu": (tf.T5EncoderModel, lambda: tf.T5Config(
        vocab_size=VOCAB, d_model=24, d_kv=4, d_ff=40, num_layers=2, num_heads=3, feed_forward_proj="relu"), "t5"),
    "clip-legacy-eos": (tf.CLIPTextModel, lambda: tf.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, eos_token_id=2), "clip"),
    "clip-eos-id": (tf.CLIPTextModel, lambda: tf.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, eos_token_id=VOCAB - 3, bos_token_id=VOCAB - 4, pad_token_id=1,
        hidden_act="gelu"), "clip"),
}
DECODERS = [n for n in TINY if TINY[n][0] not in (tf.T5EncoderModel, tf.CLIPTextModel)]


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter re-drawn: norm scales around 1, biases small, matrices and tables ~ 1/sqrt(fan-in)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        value = 1 + 0.3 * noise
      elif p.ndim == 1:
        value = 0.2 * noise
      elif "embed" in name or "relative_attention_bias" in name:
        value = noise
      else:
        value = noise / np.sqrt(p.shape[-1])
      p.copy_(value.to(p.dtype))
  return model.eval()


@functools.lru_cache(maxsize=None)
def torch_model(name: str):
  cls, make_config, _ = TINY[name]
  torch.manual_seed(0)
  return randomize(cls(make_config()), seed=sum(map(ord, name)))


def config_dict(tm) -> dict:
  d = tm.config.to_dict()
  d["architectures"] = [type(tm).__name__]
  return d


def state_dict(tm) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in tm.state_dict().items()}


def jax_model(name: str, *, dtype=np.float32, num_layers: int | None = None, scan_layers: bool = True):
  tm = torch_model(name)
  cfg = text_config_from_transformers(config_dict(tm), num_layers)
  module = {"text-decoder": DecoderEncoder, "t5": T5Encoder, "clip": CLIPTextEncoder}[kind(cfg)]
  m = module(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
  return load_state_dict(m, read_tensors(cfg, TINY[name][2], state_dict(tm)), TINY[name][2])


def read_tensors(cfg, layout: str, sd: dict) -> dict:
  """The tensors of `sd` the encoder reads (without the LM head, cut layers, vision tower, buffers)."""
  k = kind_of(cfg)
  unread = k.unread_keys(cfg, layout, sd)
  return {name: v for name, v in sd.items() if name not in unread and name not in k.ignored}


def kind(cfg) -> str:
  return kind_of(cfg).name


def prompts(lengths: tuple[int, ...], width: int, seed: int, *, eos: int | None = None):
  """Right-padded random ids (B, width) and their attention mask; `eos` (if given) ends every prompt and pads."""
  rng = np.random.default_rng(seed)
  top = VOCAB - 5 if eos is not None else VOCAB
  ids = rng.integers(3, top, size=(len(lengths), width)).astype(np.int64)
  mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  if eos is not None:
    for b, n in enumerate(lengths):
      ids[b, n - 1:] = eos
  else:
    ids = np.where(mask > 0, ids, 0)
  return ids, mask


def rel_err(got, expected) -> float:
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
