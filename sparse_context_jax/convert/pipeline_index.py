"""The index of a converted diffusers pipeline folder: which component went where, as what.

    OUT/pipeline.json   {"pipeline": "Flux2KleinPipeline",
                         "components": {"transformer": "transformer", "vae": "vae", "text_encoder": "text-decoder"},
                         "copied": ["scheduler", "tokenizer"], "skipped": {"image_encoder": "why"},
                         "model_index": {... the source's model_index.json ...}}
    OUT/<component>/    each converted component, a folder `load` reads (a text encoder's has its tokenizer/)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparse_context_jax.errors import CheckpointError

INDEX = "pipeline.json"


def is_converted_pipeline(path: str | os.PathLike) -> bool:
  return (Path(path) / INDEX).is_file()


def read_index(path: str | os.PathLike) -> dict:
  path = Path(path)
  if not is_converted_pipeline(path):
    raise CheckpointError(f"{path} is not a converted pipeline (expected {INDEX} written by `convert`)")
  try:
    d = json.loads((path / INDEX).read_text())
    if not isinstance(d.get("components"), dict):
      raise ValueError("no components")
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{path / INDEX}: {e}") from None
  return d


def pipeline_components(path: str | os.PathLike) -> dict[str, Path]:
  """The converted components of a pipeline folder written by `convert`: name ("transformer", "vae",
  "text_encoder", "text_encoder_2", ...) -> its folder (each one `load`s)."""
  return {name: Path(path) / name for name in read_index(path)["components"]}


def component_of_kind(path: str | os.PathLike, kinds: set[str], noun: str) -> Path:
  """The one converted component of a pipeline whose kind is in `kinds` (a CheckpointError if none or several)."""
  index = read_index(path)
  found = [name for name, kind in index["components"].items() if kind in kinds]
  if len(found) != 1:
    have = ", ".join(f"{n} ({k})" for n, k in index["components"].items()) or "none"
    raise CheckpointError(f"{path} is a converted {index.get('pipeline', 'pipeline')} with "
                          f"{'no' if not found else 'several'} {noun} component(s) (components: {have})")
  return Path(path) / found[0]
