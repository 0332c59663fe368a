"""The kinds of model the converter knows, each a row of one table: its config type, module, weight rules and
detection. Conversion, export, loading and the converted folder's `config.json` (`{"kind": ..., **config}`) all
go through this table, so a new kind (text encoders next) is one more row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from sparse_context_jax.convert import detect
from sparse_context_jax.convert.rules import Rule
from sparse_context_jax.convert.tables import transformer_rules
from sparse_context_jax.convert.vae_tables import IGNORED as VAE_IGNORED
from sparse_context_jax.convert.vae_tables import vae_rules
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.model.vae import AutoencoderKL, VAEConfig

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

  def label(self, cfg) -> str:
    """How errors name a model of this kind: the transformer's family, else the kind."""
    return cfg.family if self.name == "transformer" else self.noun

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
  return KINDS["vae"] if detect.is_vae(keys, folder_config) else KINDS["transformer"]


def rules_for(cfg, layout: str) -> list[Rule]:
  """The weight rules of `cfg`'s model in a checkpoint `layout` ("diffusers" or "bfl")."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
  return kind_of(cfg).rules(cfg, layout)
