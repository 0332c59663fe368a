"""`convert` of a whole diffusers pipeline folder (`model_index.json` + one folder per component): every component
the converter knows goes to `OUT/<component>` (transformer, VAE, text encoders, each through `convert_checkpoint`),
tokenizers and the scheduler's config are copied, anything else is skipped with a note; `OUT/pipeline.json`
(`pipeline_index`) records which is which. Atomic as a whole: after any error nothing is left at `OUT`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from sparse_context_jax.convert.kinds import kind_of
from sparse_context_jax.convert.output import atomic_output, check_destination
from sparse_context_jax.convert.pipeline_index import INDEX
from sparse_context_jax.convert.sources import read_json
from sparse_context_jax.convert.streaming import OUTPUT_DTYPES, convert_checkpoint
from sparse_context_jax.convert.text_detect import text_kind_of
from sparse_context_jax.convert.tokenizer import copy_tokenizer
from sparse_context_jax.errors import CheckpointError

MODEL_INDEX = "model_index.json"
# diffusers classes of the components the converter knows (text encoders are known by their config.json).
MODEL_CLASSES = {"FluxTransformer2DModel", "Flux2Transformer2DModel", "AutoencoderKL", "AutoencoderKLFlux2"}
# The last hidden state each FLUX.2 pipeline reads of its Qwen3 / Mistral text encoder (klein: 9, 18, 27; dev: 10,
# 20, 30): the layers after it are never run, so a pipeline's conversion keeps only these (unless --text-layers).
LAST_TEXT_LAYER_READ = {"Flux2KleinPipeline": 27, "Flux2KleinKVPipeline": 27, "Flux2Pipeline": 30}
# The pipelines that sample with a reference K/V cache: their transformer's config.json is a plain
# Flux2Transformer2DModel one, so the pipeline class is what makes it `reference_attention="kv"` (sampled with
# diffusers' default `ref_fixed_timestep=0`, the only one the pipeline uses, and this project's).
REFERENCE_ATTENTION = {"Flux2KleinKVPipeline": "kv"}


@dataclasses.dataclass
class PipelineReport:
  pipeline: str                                   # the diffusers pipeline class
  converted: dict[str, object]                    # component -> its config (MMDiTConfig, VAEConfig, ...)
  copied: list[str]                               # tokenizers, scheduler
  skipped: dict[str, str]                         # component -> why


def is_pipeline(path: str | os.PathLike) -> bool:
  return (Path(path) / MODEL_INDEX).is_file()


def _role(root: Path, name: str, entry) -> tuple[str, str]:
  """What to do with one component of model_index.json: ("convert" | "copy" | "skip", why)."""
  cls = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
  folder = root / name
  if cls is None:
    return "absent", "none in this pipeline"
  if not folder.is_dir():
    return "skip", f"{cls}: no {name}/ folder"
  if cls in MODEL_CLASSES:
    return "convert", cls
  config = folder / "config.json"
  if config.is_file() and text_kind_of(read_json(config)) is not None:
    return "convert", cls
  if name.startswith("tokenizer") or (cls or "").endswith(("Tokenizer", "TokenizerFast")):
    return "copy", cls
  if (cls or "").endswith("Scheduler") or (folder / "scheduler_config.json").is_file():
    return "copy", cls
  return "skip", f"{cls}: not a model this converter knows"


def _default_cut(pipeline: str, config: Path, note: Callable[[str], None]) -> int | None:
  """The layers to keep of a pipeline's decoder text encoder: up to the last one `pipeline` reads, or all."""
  d = read_json(config)
  layers = d.get("text_config", d).get("num_hidden_layers")
  keep = LAST_TEXT_LAYER_READ.get(pipeline)
  if keep is None or not isinstance(layers, int) or layers <= keep:
    return None
  note(f"{config.parent.name}: keeping the {keep} of {layers} layers {pipeline} reads (--text-layers overrides)")
  return keep


def convert_pipeline(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32", force: bool = False,
                     progress: bool | None = None, text_layers: int | None = None,
                     note: Callable[[str], None] | None = None) -> PipelineReport:
  """Converts every known component of the diffusers pipeline folder `src` into `out/<component>` (see the
  module doc); `text_layers` applies to its Qwen3 / Mistral text encoder. Returns what was done."""
  note = note or (lambda line: print(f"note: {line}", file=sys.stderr))
  if dtype not in OUTPUT_DTYPES:
    raise CheckpointError(f"dtype {dtype!r}; expected one of {sorted(OUTPUT_DTYPES)}")
  root = Path(src)
  check_destination(out, force)
  index = read_json(root / MODEL_INDEX)
  components = {k: v for k, v in index.items() if not k.startswith("_")}
  roles = {name: _role(root, name, entry) for name, entry in components.items()}
  if not any(role == "convert" for role, _ in roles.values()):
    raise CheckpointError(f"{root / MODEL_INDEX} names no component this converter knows "
                          f"({', '.join(f'{n}: {why}' for n, (_, why) in roles.items()) or 'no components'})")
  decoders = [n for n, (role, _) in roles.items() if role == "convert" and (root / n / "config.json").is_file()
              and text_kind_of(read_json(root / n / "config.json")) == "text-decoder"]
  if text_layers is not None and not decoders:
    raise CheckpointError(f"--text-layers applies to Qwen3 / Mistral text encoders; {root} has none")
  report = PipelineReport(str(index.get("_class_name", "unknown")), {}, [], {})
  cuts = {n: text_layers if text_layers is not None else _default_cut(report.pipeline, root / n / "config.json", note)
          for n in decoders}
  with atomic_output(out, force=force, directory=True) as tmp:
    for name, (role, why) in roles.items():
      if role == "convert":
        report.converted[name] = convert_checkpoint(
            root / name, tmp / name, dtype=dtype, progress=progress,
            text_layers=cuts.get(name), reference_attention=REFERENCE_ATTENTION.get(report.pipeline),
            note=lambda line, n=name: note(f"{n}: {line}"))
      elif role == "copy":
        if name.startswith("tokenizer") or (why or "").endswith(("Tokenizer", "TokenizerFast")):
          copy_tokenizer(root / name, tmp / name)
        else:
          shutil.copytree(root / name, tmp / name)
        report.copied.append(name)
      elif role == "skip":
        report.skipped[name] = why
    (tmp / INDEX).write_text(json.dumps({
        "pipeline": report.pipeline, "dtype": dtype,
        "components": {name: kind_of(cfg).name for name, cfg in report.converted.items()},
        "copied": report.copied, "skipped": report.skipped, "model_index": index}, indent=2))
  return report
