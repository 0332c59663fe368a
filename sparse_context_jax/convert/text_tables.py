"""Weight tables of the text encoders: transformers checkpoints <-> this project's parameters, in the rule language
of the transformer's tables, plus the tensors a checkpoint holds that the encoder never reads.

A layout names where the model's tensors sit in the checkpoint (the transformers class decides the prefix):

    text-decoder  base "", causal-lm "model.", mistral3 "model.language_model.",
                  mistral3-legacy "language_model.model." (as Mistral's own repos and save_pretrained write it)
    t5            t5 ("shared.weight", the tied "encoder.embed_tokens.weight" copy unread when present),
                  t5-encoder-embed ("encoder.embed_tokens.weight" alone)
    clip          clip "" (transformers 5), clip-text-model "text_model." (transformers 4, the FLUX.1 repos)
"""

from __future__ import annotations

from sparse_context_jax.convert.rules import LinearRule, Rule, TensorRule
from sparse_context_jax.text.config import CLIPTextConfig, DecoderConfig, T5EncoderConfig

DECODER_PREFIXES = {"base": "", "causal-lm": "model.", "mistral3": "model.language_model.",
                    "mistral3-legacy": "language_model.model."}
T5_EMBEDDINGS = {"t5": "shared.weight", "t5-encoder-embed": "encoder.embed_tokens.weight"}
CLIP_PREFIXES = {"clip": "", "clip-text-model": "text_model."}
CLIP_IGNORED = frozenset({"embeddings.position_ids", "text_model.embeddings.position_ids"})  # a buffer of arange
# Parts of a Mistral3 checkpoint around its language model (and LM heads of every layout).
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def _lin(source: str, rows: int, target: str, **kw) -> LinearRule:
  return LinearRule((source,), (rows,), (target,), **kw)


def decoder_rules(cfg: DecoderConfig, layout: str) -> list[Rule]:
  p = DECODER_PREFIXES[layout]
  D, Hq, Hkv, n = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_layers
  r: list[Rule] = [TensorRule(f"{p}embed_tokens.weight", "embed.embedding")]
  if cfg.has_final_norm:
    r.append(TensorRule(f"{p}norm.weight", "final_norm.scale"))
  if n == 0:
    return r
  s = f"{p}layers.{{i}}"
  r += [
      TensorRule(f"{s}.input_layernorm.weight", "layers.input_norm.scale", layers=n),
      _lin(f"{s}.self_attn.q_proj", Hq, "layers.q", layers=n),
      _lin(f"{s}.self_attn.k_proj", Hkv, "layers.k", layers=n),
      _lin(f"{s}.self_attn.v_proj", Hkv, "layers.v", layers=n),
      _lin(f"{s}.self_attn.o_proj", D, "layers.o", layers=n),
      TensorRule(f"{s}.post_attention_layernorm.weight", "layers.post_norm.scale", layers=n),
      _lin(f"{s}.mlp.gate_proj", cfg.intermediate_size, "layers.mlp.gate", layers=n),
      _lin(f"{s}.mlp.up_proj", cfg.intermediate_size, "layers.mlp.up", layers=n),
      _lin(f"{s}.mlp.down_proj", D, "layers.mlp.down", layers=n),
  ]
  if cfg.qk_norm:
    r += [TensorRule(f"{s}.self_attn.q_norm.weight", "layers.q_norm.scale", layers=n),
          TensorRule(f"{s}.self_attn.k_norm.weight", "layers.k_norm.scale", layers=n)]
  return r


def decoder_unread(cfg: DecoderConfig, layout: str, keys) -> dict[str, str]:
  """Tensors present and never read: the LM head, the layers after the last one kept (and then the final norm),
  Mistral3's vision tower and projector."""
  p = DECODER_PREFIXES[layout]
  cut = tuple(f"{p}layers.{i}." for i in range(cfg.num_layers, cfg.num_hidden_layers))
  out = {}
  for k in keys:
    if k in _LM_HEADS:
      out[k] = "the LM head"
    elif k.startswith(_VISION):
      out[k] = "the vision tower and projector"
    elif cut and (k.startswith(cut) or k == f"{p}norm.weight"):
      out[k] = f"layers {cfg.num_layers + 1}..{cfg.num_hidden_layers} and the final norm (after the last one kept)"
  return out


def t5_rules(cfg: T5EncoderConfig, layout: str) -> list[Rule]:
  inner, n = cfg.num_heads * cfg.d_kv, cfg.num_layers
  s = "encoder.block.{i}"
  r: list[Rule] = [
      TensorRule(T5_EMBEDDINGS[layout], "embed.embedding"),
      TensorRule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "relative_attention_bias.embedding"),
      TensorRule("encoder.final_layer_norm.weight", "final_norm.scale"),
      TensorRule(f"{s}.layer.0.layer_norm.weight", "layers.attn_norm.scale", layers=n),
      _lin(f"{s}.layer.0.SelfAttention.q", inner, "layers.q", layers=n),
      _lin(f"{s}.layer.0.SelfAttention.k", inner, "layers.k", layers=n),
      _lin(f"{s}.layer.0.SelfAttention.v", inner, "layers.v", layers=n),
      _lin(f"{s}.layer.0.SelfAttention.o", cfg.d_model, "layers.o", layers=n),
      TensorRule(f"{s}.layer.1.layer_norm.weight", "layers.ff_norm.scale", layers=n),
  ]
  ff = f"{s}.layer.1.DenseReluDense"
  if cfg.is_gated_act:
    r += [_lin(f"{ff}.wi_0", cfg.d_ff, "layers.ff.gate", layers=n),
          _lin(f"{ff}.wi_1", cfg.d_ff, "layers.ff.up", layers=n),
          _lin(f"{ff}.wo", cfg.d_model, "layers.ff.down", layers=n)]
  else:
    r += [_lin(f"{ff}.wi", cfg.d_ff, "layers.ff.fc1", layers=n),
          _lin(f"{ff}.wo", cfg.d_model, "layers.ff.fc2", layers=n)]
  return r


def t5_unread(cfg: T5EncoderConfig, layout: str, keys) -> dict[str, str]:
  tied = T5_EMBEDDINGS["t5-encoder-embed"]
  return {tied: "the tied copy of shared.weight"} if layout == "t5" and tied in keys else {}


def clip_rules(cfg: CLIPTextConfig, layout: str) -> list[Rule]:
  p, D, n = CLIP_PREFIXES[layout], cfg.hidden_size, cfg.num_layers
  s = f"{p}encoder.layers.{{i}}"

  def norm(src, dst, **kw):
    return [TensorRule(f"{src}.weight", f"{dst}.scale", **kw), TensorRule(f"{src}.bias", f"{dst}.bias", **kw)]

  return [
      TensorRule(f"{p}embeddings.token_embedding.weight", "token_embed.embedding"),
      TensorRule(f"{p}embeddings.position_embedding.weight", "position_embed.embedding"),
      *norm(f"{p}final_layer_norm", "final_norm"),
      *norm(f"{s}.layer_norm1", "layers.norm1", layers=n),
      _lin(f"{s}.self_attn.q_proj", D, "layers.q", layers=n),
      _lin(f"{s}.self_attn.k_proj", D, "layers.k", layers=n),
      _lin(f"{s}.self_attn.v_proj", D, "layers.v", layers=n),
      _lin(f"{s}.self_attn.out_proj", D, "layers.o", layers=n),
      *norm(f"{s}.layer_norm2", "layers.norm2", layers=n),
      _lin(f"{s}.mlp.fc1", cfg.intermediate_size, "layers.mlp.fc1", layers=n),
      _lin(f"{s}.mlp.fc2", D, "layers.mlp.fc2", layers=n),
  ]
