"""The kinds of model the converter knows, each a row of one table: its config type, module, weight rules and
detection. Conversion, export, loading and the converted folder's `config.json` (`{"kind": ..., **config}`) all
go through this table, so a new kind is one more row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from sparse_context_jax.convert import detect, text_detect
from sparse_context_jax.convert.rules import Rule
from sparse_context_jax.convert.tables import transformer_rules
from sparse_context_jax.convert.text_tables import (CLIP_IGNORED, CLIP_PREFIXES, DECODER_PREFIXES, T5_EMBEDDINGS,
                                                    clip_rules, decoder_rules, decoder_unread, t5_rules, t5_unread)
from sparse_context_jax.convert.vae_tables import IGNORED as VAE_IGNORED
from sparse_context_jax.convert.vae_tables import vae_rules
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.model.vae import AutoencoderKL, VAEConfig
from sparse_context_jax.text import (CLIPTextConfig, CLIPTextEncoder, DecoderConfig, DecoderEncoder, T5Encoder,
                                     T5EncoderConfig)

LAYOUTS = ("diffusers", "bfl")


@dataclasses.dataclass(frozen=True)
class Kind:
  name: str                   # the "kind" of a converted folder's config.json
  noun: str                   # how messages name it
  loader: str                 # its public loader (besides `load`)
  config_type: type
  module: Callable            # module(cfg, *, rngs, dtype=..., param_dtype=..., **options) -> nnx.Module
  rules: Callable[..., list[Rule]]            # rules(cfg, layout)
  detect_layout: Callable[..., str]           # detect_layout(keys, what)
  resolve_config: Callable                    # resolve_config(shapes, layout, what, folder_config, config_path)
  ignored: frozenset[str] = frozenset()       # torch tensors that are not weights (dropped on conversion)
  layouts: tuple[str, ...] = LAYOUTS          # the checkpoint layouts its rules know
  unread: Callable[..., dict[str, str]] | None = None   # unread(cfg, layout, keys): {present tensor never read: why}
  text: bool = False                          # a text encoder (converted with its tokenizer)

  def label(self, cfg) -> str:
    """How errors name a model of this kind: the transformer's family, else the kind."""
    return cfg.family if self.name == "transformer" else self.noun

  def unread_keys(self, cfg, layout: str, keys) -> dict[str, str]:
    return {} if self.unread is None else self.unread(cfg, layout, keys)

  def to_dict(self, cfg) -> dict:
    return {"kind": self.name, **cfg.to_dict()}

  def from_dict(self, d: dict):
    return self.config_type.from_dict({k: v for k, v in d.items() if k != "kind"})

  def abstract(self, cfg, **module_kw) -> nnx.Module:
    """The module of `cfg` with shapes only (nothing allocated)."""
    return nnx.eval_shape(lambda: self.module(cfg, rngs=nnx.Rngs(0), **module_kw))


KINDS = {
    "transformer": Kind("transformer", "transformer", "load_model", MMDiTConfig, MMDiT, transformer_rules,
                        detect.detect_layout, detect.resolve_config),
    "vae": Kind("vae", "VAE", "load_vae", VAEConfig, AutoencoderKL, vae_rules, detect.detect_vae_layout,
                detect.resolve_vae_config, frozenset(VAE_IGNORED)),
    "text-decoder": Kind("text-decoder", "Qwen3 / Mistral text encoder", "load_text_encoder", DecoderConfig,
                         DecoderEncoder, decoder_rules, text_detect.decoder_layout, text_detect.resolve_decoder_config,
                         layouts=tuple(DECODER_PREFIXES), unread=decoder_unread, text=True),
    "t5": Kind("t5", "T5 encoder", "load_text_encoder", T5EncoderConfig, T5Encoder, t5_rules, text_detect.t5_layout,
               text_detect.resolve_t5_config, layouts=tuple(T5_EMBEDDINGS), unread=t5_unread, text=True),
    "clip": Kind("clip", "CLIP text encoder", "load_text_encoder", CLIPTextConfig, CLIPTextEncoder, clip_rules,
                 text_detect.clip_layout, text_detect.resolve_clip_config, CLIP_IGNORED, layouts=tuple(CLIP_PREFIXES),
                 text=True),
}


def kind_of(cfg) -> Kind:
  for kind in KINDS.values():
    if isinstance(cfg, kind.config_type):
      return kind
  raise TypeError(f"no converter for a {type(cfg).__name__}")


def kind_named(name: str, where: str) -> Kind:
  if name not in KINDS:
    raise CheckpointError(f"{where}: unknown kind {name!r}; expected one of {sorted(KINDS)}")
  return KINDS[name]


def detect_kind(keys, folder_config: dict | None) -> Kind:
  """The kind of a torch checkpoint from its tensor names and config.json."""
  text = text_detect.text_kind_of(folder_config)
  if text is not None:
    return KINDS[text]
  return KINDS["vae"] if detect.is_vae(keys, folder_config) else KINDS["transformer"]


def rules_for(cfg, layout: str) -> list[Rule]:
  """The weight rules of `cfg`'s model in a checkpoint `layout` ("diffusers" or "bfl"; a text encoder's own, see
  `text_tables`)."""
  kind = kind_of(cfg)
  if layout not in kind.layouts:
    raise ValueError(f"unknown {kind.noun} checkpoint layout {layout!r}; expected one of {kind.layouts}")
  return kind.rules(cfg, layout)
