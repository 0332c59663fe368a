"""Architecture descriptions of the text encoders: one frozen dataclass per family, each built from a transformers
`config.json` dict (`from_transformers`) and serialisable to/from JSON.

The decoder-only family covers Qwen3 and Mistral (also Mistral3's text model): what differs is a field (q/k norm,
biases, sliding window), never a branch on the family name.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

DECODER_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3Model", "MistralForCausalLM", "MistralModel",
                         "Mistral3ForConditionalGeneration")
T5_ARCHITECTURES = ("T5EncoderModel",)
CLIP_ARCHITECTURES = ("CLIPTextModel",)
ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu", "quick_gelu", "relu")


class _Serialisable:
  """to_dict / from_dict (strict about unknown and missing keys) / JSON / replace for the configs below."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING)
    if unknown or missing:
      raise ValueError(f"{cls.__name__} dict: unknown keys {unknown}, missing keys {missing}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str):
    return cls.from_dict(json.loads(text))

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def _check(self, positive: tuple[str, ...], extra: list[str]) -> None:
    problems = [f"{n}={getattr(self, n)} (expected > 0)" for n in positive if int(getattr(self, n)) <= 0] + extra
    if problems:
      raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))


def _architecture(d: dict[str, Any], allowed: tuple[str, ...]) -> str:
  found = d.get("architectures") or []
  if len(found) != 1 or found[0] not in allowed:
    raise ValueError(f"config.json architectures {found}; expected one of {list(allowed)}")
  return found[0]


def _rope_theta(d: dict[str, Any]) -> float:
  """RoPE base of a transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`) config."""
  params = d.get("rope_parameters") or {}
  rope_type = params.get("rope_type", (d.get("rope_scaling") or {}).get("rope_type", "default"))
  if rope_type != "default":
    raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default' RoPE)")
  return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


@dataclasses.dataclass(frozen=True)
class DecoderConfig(_Serialisable):
  """A Qwen3 / Mistral decoder-only transformer used as a text encoder (its hidden states, no LM head).

  Attributes:
    architecture: the transformers class of the checkpoint (its tensor names depend on it).
    vocab_size, hidden_size, intermediate_size: embedding rows, hidden size D, SwiGLU width.
    num_hidden_layers: decoder layers of the checkpoint.
    num_heads, num_kv_heads, head_dim: query heads, key/value heads (grouped-query attention), head size.
    rope_theta: RoPE base (rotate-half RoPE over the whole head).
    rms_norm_eps: epsilon of every RMSNorm.
    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
    attention_bias: biases on the q/k/v/o projections.
    sliding_window: keys further back than this many positions are masked (Mistral), None for full attention.
    hidden_act: activation of the gate ("silu").
    num_layers: layers built and run (the first ones); fewer than `num_hidden_layers` when a pipeline reads an
      earlier hidden state. The final norm exists only in a model of every layer.
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  qk_norm: bool
  attention_bias: bool = False
  sliding_window: int | None = None
  hidden_act: str = "silu"
  num_layers: int | None = None

  def __post_init__(self):
    if self.num_layers is None:
      object.__setattr__(self, "num_layers", self.num_hidden_layers)
    extra = []
    if self.architecture not in DECODER_ARCHITECTURES:
      extra.append(f"architecture={self.architecture!r} (expected one of {list(DECODER_ARCHITECTURES)})")
    if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
      extra.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      extra.append(f"head_dim={self.head_dim} (RoPE needs an even head dim)")
    if not 0 <= self.num_layers <= self.num_hidden_layers:
      extra.append(f"num_layers={self.num_layers} (expected 0..num_hidden_layers={self.num_hidden_layers})")
    if self.hidden_act not in ACTIVATIONS:
      extra.append(f"hidden_act={self.hidden_act!r} (expected one of {list(ACTIVATIONS)})")
    if self.sliding_window is not None and self.sliding_window <= 0:
      extra.append(f"sliding_window={self.sliding_window} (expected > 0 or None)")
    self._check(("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"), extra)

  @property
  def has_final_norm(self) -> bool:
    return self.num_layers == self.num_hidden_layers

  @classmethod
  def from_transformers(cls, d: dict[str, Any], num_layers: int | None = None) -> "DecoderConfig":
    """From a Qwen3 / Mistral `config.json` dict, or a Mistral3 one (its nested `text_config`)."""
    arch = _architecture(d, DECODER_ARCHITECTURES)
    t = (d.get("text_config") or {}) if arch == "Mistral3ForConditionalGeneration" else d
    if not t:
      raise ValueError("a Mistral3ForConditionalGeneration config.json needs its text_config")
    qwen3 = t.get("model_type", d.get("model_type")) == "qwen3" or arch.startswith("Qwen3")
    if qwen3 and t.get("use_sliding_window"):
      raise ValueError("Qwen3 with use_sliding_window=true is not supported")
    try:
      heads = t["num_attention_heads"]
      return cls(architecture=arch, vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                 intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"], num_heads=heads,
                 num_kv_heads=t.get("num_key_value_heads") or heads,
                 head_dim=t.get("head_dim") or t["hidden_size"] // heads, rope_theta=_rope_theta(t),
                 rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)), qk_norm=qwen3,
                 attention_bias=bool(t.get("attention_bias", False)),
                 sliding_window=None if qwen3 else t.get("sliding_window"), hidden_act=t.get("hidden_act", "silu"),
                 num_layers=num_layers)
    except KeyError as e:
      raise ValueError(f"{arch} config.json lacks {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig(_Serialisable):
  """The encoder of T5 (T5EncoderModel): relative position buckets (one table, in the first layer, shared by all),
  T5 RMS LayerNorm, unscaled attention, gated (v1.1) or plain feed-forward.

  Attributes:
    vocab_size, d_model, d_kv, d_ff, num_heads, num_layers: sizes (inner attention width num_heads * d_kv).
    relative_attention_num_buckets, relative_attention_max_distance: the bidirectional position buckets.
    layer_norm_epsilon: epsilon of every layer norm.
    dense_act_fn: activation of the feed-forward ("gelu_new" for v1.1, "relu" for the original T5).
    is_gated_act: act(wi_0 x) * wi_1 x (v1.1) instead of act(wi x).
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  num_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  is_gated_act: bool = True
  architecture: str = "T5EncoderModel"

  def __post_init__(self):
    extra = [] if self.dense_act_fn in ACTIVATIONS else [
        f"dense_act_fn={self.dense_act_fn!r} (expected one of {list(ACTIVATIONS)})"]
    self._check(("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"), extra)

  @classmethod
  def from_transformers(cls, d: dict[str, Any]) -> "T5EncoderConfig":
    arch = _architecture(d, T5_ARCHITECTURES)
    proj = d.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    try:
      return cls(vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
                 num_heads=d["num_heads"], num_layers=d["num_layers"],
                 relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
                 relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
                 layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)), dense_act_fn=act, is_gated_act=gated,
                 architecture=arch)
    except KeyError as e:
      raise ValueError(f"{arch} config.json lacks {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_Serialisable):
  """The text tower of CLIP (CLIPTextModel): learned positions, causal pre-LayerNorm blocks, final LayerNorm, the
  pooled vector at the end-of-text token.

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_heads, num_layers, max_position_embeddings: sizes.
    layer_norm_eps: epsilon of every LayerNorm.
    hidden_act: MLP activation ("quick_gelu" for OpenAI's CLIP).
    eos_token_id: pooling position: 2 is the legacy rule (argmax of the ids, the highest id being end-of-text),
      any other value the first position holding it.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_layers: int
  max_position_embeddings: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 2
  architecture: str = "CLIPTextModel"

  def __post_init__(self):
    extra = [] if self.hidden_act in ACTIVATIONS else [
        f"hidden_act={self.hidden_act!r} (expected one of {list(ACTIVATIONS)})"]
    if self.num_heads > 0 and self.hidden_size % self.num_heads:
      extra.append(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
    self._check(("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers",
                 "max_position_embeddings"), extra)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_transformers(cls, d: dict[str, Any]) -> "CLIPTextConfig":
    arch = _architecture(d, CLIP_ARCHITECTURES)
    try:
      return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                 num_heads=d["num_attention_heads"], num_layers=d["num_hidden_layers"],
                 max_position_embeddings=d.get("max_position_embeddings", 77),
                 layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)), hidden_act=d.get("hidden_act", "quick_gelu"),
                 eos_token_id=int(d.get("eos_token_id", 2)), architecture=arch)
    except KeyError as e:
      raise ValueError(f"{arch} config.json lacks {e.args[0]!r}") from None


def text_config_from_transformers(d: dict[str, Any], num_layers: int | None = None):
  """The config of any supported transformers text encoder, by its `architectures`. `num_layers` cuts a
  decoder-only model after that many layers (the other families always run every layer)."""
  found = (d.get("architectures") or [None])[0]
  if found in DECODER_ARCHITECTURES:
    return DecoderConfig.from_transformers(d, num_layers)
  if num_layers is not None:
    raise ValueError(f"a layer cut applies to decoder-only text encoders, not to {found}")
  if found in T5_ARCHITECTURES:
    return T5EncoderConfig.from_transformers(d)
  if found in CLIP_ARCHITECTURES:
    return CLIPTextConfig.from_transformers(d)
  raise ValueError(f"config.json architectures {d.get('architectures')}; expected one of "
                   f"{list(DECODER_ARCHITECTURES + T5_ARCHITECTURES + CLIP_ARCHITECTURES)}")
