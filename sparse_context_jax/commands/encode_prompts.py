"""`encode-prompts PROMPTS.txt|JOBS.jsonl OUT_DIR`: text prompts -> `.npz` embeddings, reusable across runs.

- `PROMPTS.txt`: one prompt per line (blank lines skipped; a line of only `""` is the empty prompt). Writes
  `OUT_DIR/line-NNNNN.npz` (`txt`, and `y` for FLUX.1) and `OUT_DIR/prompts.jsonl`, one row per prompt: its line,
  text, file and whether it was truncated.
- `JOBS.jsonl`: the jobs of `generate`. Every job with a text `prompt` (and `negative_prompt`) gets
  `OUT_DIR/line-NNNNN.npz` (`txt`, `y`, and `neg_txt`, `neg_y` for true CFG), and `OUT_DIR/jobs.jsonl` holds the
  same jobs with `"prompt_embeds"` in place of the text and their paths made absolute: `generate OUT_DIR/jobs.jsonl`
  then runs without a text encoder.

Each distinct text is encoded once, in batches of `--batch-size` (one compiled program). A line that is not a job
or whose prompt is not a string is reported with its number; the others are written. OUT_DIR is written whole or
not at all. Exit status: 0, 1 when some lines were bad, 2 on a user error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sparse_context_jax.cli import UserError
from sparse_context_jax.convert.output import OutputExistsError, atomic_output
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.progress import progress

PATH_FIELDS = ("references", "masks", "output", "prompt_embeds")


def add_arguments(parser) -> None:
  parser.add_argument("prompts", metavar="PROMPTS.txt|JOBS.jsonl", help="prompts, one per line, or generate's jobs")
  parser.add_argument("out", metavar="OUT_DIR", help="new folder for the .npz files (must not exist or be empty)")
  text = parser.add_mutually_exclusive_group(required=True)
  text.add_argument("--text-encoder", nargs="+", metavar="DIR", help="converted text encoder(s): one Qwen3 / "
                    "Mistral folder, T5 and CLIP (FLUX.1), or a converted pipeline folder")
  text.add_argument("--random-text-encoder", metavar="PRESET|CONFIG_JSON", help="random weights of the text "
                    "encoder family of this transformer preset or MMDiTConfig JSON, with a tiny tokenizer")
  parser.add_argument("--max-sequence-length", type=int, default=512, help="text tokens per prompt")
  parser.add_argument("--batch-size", type=int, default=8, help="prompts per text-encoder call")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--seed", type=int, default=0, help="seed of --random-text-encoder")
  parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def _read_prompts(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
  """(line, row) pairs, row {"prompt": text, ...}, and (line, error) for the bad ones."""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  rows, bad = [], []
  for n, text in enumerate(lines, 1):
    if not text.strip():
      continue
    if path.suffix != ".jsonl":
      rows.append((n, {"prompt": "" if text.strip() == '""' else text}))
      continue
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      bad.append((n, f"not JSON ({e.msg})"))
      continue
    if not isinstance(row, dict):
      bad.append((n, f"a job is a JSON object, got {type(row).__name__}"))
    elif "prompt" not in row and "prompt_embeds" not in row:
      bad.append((n, "no \"prompt\" (text) or \"prompt_embeds\""))
    elif "prompt" not in row:   # embeddings already: passes through to jobs.jsonl
      rows.append((n, row))
    elif not isinstance(row["prompt"], str) or not isinstance(row.get("negative_prompt", ""), str):
      bad.append((n, "prompt and negative_prompt must be strings"))
    else:
      rows.append((n, row))
  return rows, bad


def _encoder(args):
  from sparse_context_jax.encoders.prompts import load_prompt_encoder, random_prompt_encoder
  try:
    if args.random_text_encoder:
      from sparse_context_jax.commands.generate import _random_config
      from sparse_context_jax.model import PRESETS, MMDiTConfig
      cfg = _random_config(args.random_text_encoder, PRESETS, MMDiTConfig, "text-encoder")
      return random_prompt_encoder(cfg, seed=args.seed)
    import jax.numpy as jnp
    return load_prompt_encoder(*args.text_encoder, dtype=jnp.dtype(args.dtype))
  except (CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None


def _absolute(row: dict, base: Path) -> dict:
  """The job with its relative paths resolved against the jobs file's folder."""
  out = dict(row)
  for key in PATH_FIELDS:
    if isinstance(out.get(key), str):
      out[key] = str((base / out[key]).resolve())
    elif isinstance(out.get(key), list):
      out[key] = [str((base / v).resolve()) if isinstance(v, str) else v for v in out[key]]
  return out


def run(args) -> int:
  for name in ("batch_size", "max_sequence_length"):
    if getattr(args, name) <= 0:
      raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} (expected > 0)")
  src = Path(args.prompts)
  if not src.is_file():
    raise UserError(f"{src} does not exist" if not src.exists() else f"{src} is not a file")
  rows, bad = _read_prompts(src)
  for n, error in bad:
    print(f"{src}:{n}: {error}", file=sys.stderr)
  jobs = src.suffix == ".jsonl"
  texts = sorted({t for _, r in rows for t in (r.get("prompt"), r.get("negative_prompt")) if t is not None})
  try:
    with atomic_output(args.out, force=args.force, directory=True) as tmp:
      encoder = _encoder(args) if texts else None
      encoded, truncated = {}, set()
      with progress(len(texts), "encode-prompts", "prompt") as bar:
        for i in range(0, len(texts), args.batch_size):
          chunk = texts[i:i + args.batch_size]
          emb = encoder(chunk + [chunk[-1]] * (args.batch_size - len(chunk)),
                        max_sequence_length=args.max_sequence_length)
          for b, t in enumerate(chunk):
            encoded[t] = {"txt": np.asarray(emb.txt[b], np.float32),
                          **({"y": np.asarray(emb.y[b], np.float32)} if emb.y is not None else {})}
            if emb.truncated[b]:
              truncated.add(t)
          bar.update(len(chunk))
      index = []
      for n, row in rows:
        if "prompt" not in row:
          index.append(_absolute(row, src.parent.resolve()))
          continue
        name = f"line-{n:05d}.npz"
        arrays = dict(encoded[row["prompt"]])
        if row.get("negative_prompt") is not None:
          arrays.update({f"neg_{k}": v for k, v in encoded[row["negative_prompt"]].items()})
        np.savez(tmp / name, **arrays)
        cut = [k for k in ("prompt", "negative_prompt") if row.get(k) in truncated]
        for k in cut:
          print(f"{src}:{n}: warning: {k} is longer than --max-sequence-length {args.max_sequence_length} tokens: "
                "truncated", file=sys.stderr)
        if jobs:
          job = {k: v for k, v in _absolute(row, src.parent.resolve()).items() if k not in ("prompt",
                                                                                              "negative_prompt")}
          index.append({**job, "prompt_embeds": str((Path(args.out) / name).resolve())})
        else:
          index.append({"line": n, "prompt": row["prompt"], "prompt_embeds": name, "truncated": bool(cut)})
      (tmp / ("jobs.jsonl" if jobs else "prompts.jsonl")).write_text("".join(json.dumps(r) + "\n" for r in index))
  except OutputExistsError as e:
    raise UserError(str(e)) from None
  written = sum("prompt" in row for _, row in rows)   # jobs that held embeddings already write no file
  print(f"wrote {written} embedding file(s) of {len(texts)} distinct text(s) to {args.out}; {len(bad)} bad "
        "line(s)")
  return 1 if bad else 0
