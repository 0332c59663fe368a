"""The tokenizer that goes with a converted text encoder: found beside its weights (a transformers repo) or in the
sibling folder a diffusers pipeline gives it (`text_encoder/` -> `tokenizer/`, `text_encoder_2/` -> `tokenizer_2/`),
checked against the embedding, copied to `OUT/tokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sparse_context_jax.errors import CheckpointError

TOKENIZER_DIR = "tokenizer"
# Files that make a folder hold a tokenizer (any one of them), and model files that never go with it.
_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model", "tekken.json")
_MODEL_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index.json")


def _has_tokenizer(folder: Path) -> bool:
  return folder.is_dir() and any((folder / name).is_file() for name in _MARKERS)


def find_tokenizer(model_folder: str | Path) -> Path:
  """The folder of the tokenizer of the text encoder in `model_folder`: the folder itself, else the pipeline's
  sibling `tokenizer[_N]/` for a `text_encoder[_N]/`."""
  folder = Path(model_folder)
  looked = [folder]
  if _has_tokenizer(folder):
    return folder
  if folder.name.startswith("text_encoder"):
    sibling = folder.parent / ("tokenizer" + folder.name[len("text_encoder"):])
    looked.append(sibling)
    if _has_tokenizer(sibling):
      return sibling
  raise CheckpointError(f"no tokenizer for the text encoder {folder}: none of {', '.join(_MARKERS)} in "
                        f"{' or '.join(str(p) for p in looked)}")


# What the child process of `check_tokenizer` runs: prints {"size": n} or {"error": "Type: message"} on stdout. torch
# is hidden from it (a None in sys.modules reads as not installed): transformers imports torch wherever it is
# installed, which a tokenizer never needs, and the import would cost the conversion 1.2 s of CPU.
_TOKENIZER_SIZE = """
import json, sys
sys.modules["torch"] = None
try:
  from transformers import AutoTokenizer
  print(json.dumps({"size": len(AutoTokenizer.from_pretrained(sys.argv[1]))}))
except Exception as e:
  print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def check_tokenizer(folder: Path, vocab_size: int, what: str) -> int:
  """Loads the tokenizer (transformers' AutoTokenizer) and checks that every id it produces has an embedding row;
  returns its size.

  The tokenizer is loaded in a child Python process: importing transformers takes seconds of CPU, which there run
  on another core instead of holding this process's interpreter while a conversion streams its weights."""
  r = subprocess.run([sys.executable, "-c", _TOKENIZER_SIZE, str(folder)], capture_output=True, text=True,
                     env={**os.environ, "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})
  try:
    answer = json.loads(r.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    answer = {"error": f"the loading process ended with status {r.returncode}: {r.stderr.strip()[-2000:]}"}
  if "error" in answer:   # a tokenizer folder can fail in many library-specific ways; each is a bad input here
    raise CheckpointError(f"cannot load the tokenizer in {folder}: {answer['error']}")
  n = answer["size"]
  if n > vocab_size:
    raise CheckpointError(f"the tokenizer in {folder} has {n} tokens but {what} embeds only {vocab_size} "
                          "(vocab_size): it is not this model's tokenizer")
  return n


def copy_tokenizer(folder: Path, dest: Path) -> None:
  """Copies the tokenizer's files (not the model's config or weights) into `dest`."""
  dest.mkdir()
  for p in sorted(folder.iterdir()):
    if p.is_file() and p.name not in _MODEL_FILES and not p.name.endswith(_WEIGHT_SUFFIXES):
      shutil.copy2(p, dest / p.name)
