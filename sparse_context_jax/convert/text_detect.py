"""Which text encoder is this: the kind from `config.json`'s `architectures`, the layout from tensor names, the
config from `config.json` (transformers' or this project's own) or `--config`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from sparse_context_jax.convert.text_tables import CLIP_PREFIXES, DECODER_PREFIXES, T5_EMBEDDINGS
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.text.config import (CLIP_ARCHITECTURES, DECODER_ARCHITECTURES, T5_ARCHITECTURES,
                                            CLIPTextConfig, DecoderConfig, T5EncoderConfig)

TEXT_KINDS = {"text-decoder": DECODER_ARCHITECTURES, "t5": T5_ARCHITECTURES, "clip": CLIP_ARCHITECTURES}
_CONFIG_TYPES = {"text-decoder": DecoderConfig, "t5": T5EncoderConfig, "clip": CLIPTextConfig}


def text_kind_of(folder_config: Mapping | None) -> str | None:
  """The text kind named by a transformers config.json (its `architectures`), else None."""
  if not folder_config:
    return None
  if folder_config.get("kind") in TEXT_KINDS:
    return folder_config["kind"]
  found = folder_config.get("architectures") or []
  for kind, archs in TEXT_KINDS.items():
    if any(a in archs for a in found):
      return kind
  return None


def _layout(keys, what: str, probes: Mapping[str, str], noun: str) -> str:
  present = set(keys)
  found = [layout for layout, key in probes.items() if key in present]
  if not found:
    raise CheckpointError(f"{what} is not a {noun}: none of {', '.join(sorted(probes.values()))} among its "
                          f"{len(present)} tensor(s)")
  return found[0]


def decoder_layout(keys, what: str) -> str:
  probes = {layout: f"{p}embed_tokens.weight" for layout, p in DECODER_PREFIXES.items()}
  return _layout(keys, what, probes, "Qwen3 / Mistral checkpoint")


def t5_layout(keys, what: str) -> str:
  return _layout(keys, what, T5_EMBEDDINGS, "T5 encoder checkpoint")


def clip_layout(keys, what: str) -> str:
  probes = {layout: f"{p}embeddings.token_embedding.weight" for layout, p in CLIP_PREFIXES.items()}
  return _layout(keys, what, probes, "CLIP text checkpoint")


def _resolver(kind: str):
  config_type = _CONFIG_TYPES[kind]

  def resolve(shapes, layout: str, what: str, folder_config: dict | None, config_path: str | None):
    """--config, else the folder's config.json; a text encoder's sizes are never guessed from shapes."""
    d, where = folder_config, f"{what}/config.json"
    if config_path is not None:
      try:
        d, where = json.loads(Path(config_path).read_text()), f"--config {config_path}"
      except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read --config {config_path}: {e}") from None
    if d is None:
      raise CheckpointError(f"{what}: a text encoder needs its config.json (or --config)")
    try:
      if d.get("kind") == kind:
        return config_type.from_dict({k: v for k, v in d.items() if k != "kind"})
      return config_type.from_transformers(d)
    except (ValueError, TypeError) as e:
      raise CheckpointError(f"{where}: {e}") from None

  return resolve


resolve_decoder_config, resolve_t5_config, resolve_clip_config = (_resolver(k) for k in TEXT_KINDS)
