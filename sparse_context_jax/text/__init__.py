"""Flax NNX text encoders of the FLUX pipelines: one decoder-only transformer (Qwen3 for FLUX.2 klein, Mistral for
FLUX.2 dev), the T5 encoder and the CLIP text model (FLUX.1)."""

from sparse_context_jax.text.clip import CLIPTextEncoder, CLIPTextOutput
from sparse_context_jax.text.config import (CLIPTextConfig, DecoderConfig, T5EncoderConfig,
                                            text_config_from_transformers)
from sparse_context_jax.text.decoder import DecoderEncoder
from sparse_context_jax.text.t5 import T5Encoder

__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "CLIPTextOutput", "DecoderConfig", "DecoderEncoder", "T5Encoder",
           "T5EncoderConfig", "text_config_from_transformers"]
