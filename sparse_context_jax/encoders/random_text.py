"""Small random text encoders of the right family for a transformer config, with tiny tokenizers built offline.

FLUX.2 klein (no guidance embedder) gets a Qwen3, FLUX.2 dev a Mistral, each of hidden size context_dim / 3 and
three layers, whose hidden states 1, 2, 3 are stacked as the real recipe stacks 9, 18, 27 (10, 20, 30). FLUX.1
gets a T5 of d_model context_dim and a CLIP of hidden size pooled_dim, two layers each. Attention and MLP widths
are small whatever the hidden size, so even a full-size preset's encoder fits a CPU.
"""

from __future__ import annotations

from flax import nnx

from sparse_context_jax.encoders.tiny_tokenizers import build_tokenizer
from sparse_context_jax.model.config import MMDiTConfig

LAYERS = (1, 2, 3)


def _vocab(tokenizer) -> int:
  return (len(tokenizer) + 63) // 64 * 64


def _decoder(kind: str, hidden: int, vocab: int):
  from sparse_context_jax.text import DecoderConfig
  arch = "Qwen3ForCausalLM" if kind == "qwen3" else "MistralForCausalLM"
  return DecoderConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=len(LAYERS) + 1, num_heads=2, num_kv_heads=1, head_dim=16,
                       rope_theta=1e6 if kind == "qwen3" else 1e9, rms_norm_eps=1e-6, qk_norm=kind == "qwen3",
                       num_layers=max(LAYERS))


def random_parts(cfg: MMDiTConfig, *, seed: int):
  """(recipe name, {component: Flax encoder}, {component: tokenizer}) sized for `cfg`; ValueError when no text
  encoder of its family gives its context (and pooled) dims."""
  from sparse_context_jax.text import CLIPTextConfig, CLIPTextEncoder, DecoderEncoder, T5Encoder, T5EncoderConfig
  rngs = nnx.Rngs(seed)
  if cfg.family == "flux2":
    if cfg.context_dim % 3:
      raise ValueError(f"context_dim {cfg.context_dim} of a FLUX.2 transformer is not 3 x a text hidden size")
    kind = "mistral" if cfg.guidance_embed else "qwen3"
    tok = build_tokenizer(kind)
    model = DecoderEncoder(_decoder(kind, cfg.context_dim // 3, _vocab(tok)), rngs=rngs)
    return ("flux2-dev" if kind == "mistral" else "flux2-klein"), {"text_encoder": model}, {"text_encoder": tok}
  if cfg.pooled_dim <= 0:
    raise ValueError("a FLUX.1 transformer without a pooled vector (pooled_dim 0) has no CLIP to random-draw")
  clip_tok, t5_tok = build_tokenizer("clip"), build_tokenizer("t5")
  heads = 2 if cfg.pooled_dim % 2 == 0 else 1
  clip = CLIPTextEncoder(CLIPTextConfig(vocab_size=_vocab(clip_tok), hidden_size=cfg.pooled_dim, intermediate_size=64,
                                        num_heads=heads, num_layers=2, max_position_embeddings=77), rngs=rngs)
  t5 = T5Encoder(T5EncoderConfig(vocab_size=_vocab(t5_tok), d_model=cfg.context_dim, d_kv=16, d_ff=64, num_heads=2,
                                 num_layers=2), rngs=rngs)
  return "flux1", {"text_encoder": clip, "text_encoder_2": t5}, {"text_encoder": clip_tok, "text_encoder_2": t5_tok}
