"""Tiny torch text encoders, tiny tokenizers and diffusers pipelines around them: the prompt references.

`reference_pipeline(recipe)` builds the diffusers pipeline of a recipe (FluxPipeline, Flux2KleinPipeline,
Flux2Pipeline) with tiny random transformers encoders (weights re-drawn at a scale that makes every layer count)
and the project's tiny tokenizers; `encode(pipe, prompts, msl)` runs its `encode_prompt` and records what each
text encoder was fed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sparse_context_jax.encoders.tiny_tokenizers import MISTRAL_TEMPLATE, build_tokenizer

# Sizes: hidden 16 -> FLUX.2 context 48; T5 d_model 32 and CLIP hidden 24 -> FLUX.1 context 32, pooled 24 (the
# tiny transformers of tests/reference.py).
QWEN3 = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True)
MISTRAL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=31, num_attention_heads=4,
               num_key_value_heads=2, head_dim=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
               sliding_window=None)
T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=8, relative_attention_max_distance=20, layer_norm_epsilon=1e-6)
CLIP = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)   # 2: the legacy pooling of FLUX.1


def redraw(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every weight re-drawn: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(p.shape[-1]))
      elif "norm" in name or "ln" in name:
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def vocab_size(tokenizer) -> int:
  return (len(tokenizer) + 31) // 32 * 32


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
  return build_tokenizer(kind)


def torch_encoder(kind: str, seed: int = 0):
  import transformers as tf
  v = vocab_size(tokenizer(kind))
  if kind == "qwen3":
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=v, **QWEN3))
  elif kind == "mistral":
    text = tf.MistralConfig(vocab_size=v, **MISTRAL)
    vision = tf.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, head_dim=8, image_size=32, patch_size=16)
    model = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(text_config=text, vision_config=vision,
                                                                  spatial_merge_size=1))
  elif kind == "t5":
    model = tf.T5EncoderModel(tf.T5Config(vocab_size=v, **T5))
  elif kind == "clip":
    model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=v, **CLIP))
  else:
    raise ValueError(kind)
  return redraw(model.float(), seed)


def processor():
  """Flux2Pipeline's tokenizer: a PixtralProcessor around the tiny Mistral tokenizer.

  Without torchvision transformers offers only a placeholder class; the real one is imported with the PIL image
  processor's module standing in for the torchvision one (the text path never touches images)."""
  import importlib
  import sys
  pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
  sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", pil)
  PixtralProcessor = importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
  PixtralImageProcessorPil = pil.PixtralImageProcessorPil
  return PixtralProcessor(image_processor=PixtralImageProcessorPil(), tokenizer=tokenizer("mistral"),
                          chat_template=MISTRAL_TEMPLATE, patch_size=16, spatial_merge_size=1)


@functools.lru_cache(maxsize=None)
def reference_pipeline(recipe: str):
  from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, FluxPipeline
  sched = FlowMatchEulerDiscreteScheduler()
  if recipe == "flux1":
    return FluxPipeline(scheduler=sched, vae=None, text_encoder=torch_encoder("clip", 1), tokenizer=tokenizer("clip"),
                        text_encoder_2=torch_encoder("t5", 2), tokenizer_2=tokenizer("t5"), transformer=None)
  if recipe == "flux2-klein":
    return Flux2KleinPipeline(scheduler=sched, vae=None, text_encoder=torch_encoder("qwen3", 3),
                              tokenizer=tokenizer("qwen3"), transformer=None)
  if recipe == "flux2-dev":
    return Flux2Pipeline(scheduler=sched, vae=None, text_encoder=torch_encoder("mistral", 4), tokenizer=processor(),
                         transformer=None)
  raise ValueError(recipe)


def encode(pipe, prompts: list[str], max_sequence_length: int) -> tuple[dict, dict]:
  """(outputs of `pipe.encode_prompt` as float64/int numpy: txt, txt_ids, y (or None)), {component: (input_ids,
  attention_mask or None)} as the pipeline fed its encoders."""
  fed = {}

  def hook(name):
    def record(module, args, kwargs):
      ids = kwargs.get("input_ids", args[0] if args else None)
      mask = kwargs.get("attention_mask")
      fed[name] = (ids.numpy(), None if mask is None else mask.numpy())
    return record

  names = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
  handles = [getattr(pipe, n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
  try:
    with torch.no_grad():
      out = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=max_sequence_length)
  finally:
    for h in handles:
      h.remove()
  if len(out) == 3:
    txt, y, ids = out
  else:
    (txt, ids), y = out, None
  res = {"txt": txt.double().numpy(), "txt_ids": ids.numpy(), "y": None if y is None else y.double().numpy()}
  return res, fed
