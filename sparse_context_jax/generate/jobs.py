"""Generation jobs: one JSON object per line of a JSONL file, validated line by line.

    {"prompt": "embeds/cat.npz",          # npz: txt (T, context_dim); y (pooled_dim) for FLUX.1;
                                          #      neg_txt (and neg_y) for true CFG
     "references": ["a.png", "b.png"],    # 1..max_refs images (FLUX.1 Kontext: one), any size and mode
     "masks": ["m.png", null],            # optional, one per reference (strategy "mask", or hybrid on masks)
     "task": "editing",                   # "editing" or "composition": picks the default strategy
     "strategy": "edge", "keep": 0.25,    # or "tau": 0.6; neither: dense references (keep 1)
     "size": [512, 512],                  # target (H, W), multiples of 16; references are resized to it
     "steps": 4, "guidance": 3.5, "cfg": 4.0, "seed": 0,
     "output": "out/cat.png"}

Relative paths are relative to the JSONL file's folder. Prompts are embedding files (`.npz`). Every job, from a
file or from code, is built by `make_job`, which checks what depends on the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sparse_context_jax.encoders.base import unit_range
from sparse_context_jax.images import ImageError, load_image, load_mask, resize_crop
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.positions import TOKEN_PIXELS
from sparse_context_jax.sparse.pack import SparseRequest

TASK_STRATEGY = {"editing": ("hybrid", "edge"), "composition": ("hybrid", "saliency")}
FIELDS = {"prompt", "references", "masks", "task", "strategy", "keep", "tau", "size", "steps", "guidance", "cfg",
          "seed", "output"}


@dataclasses.dataclass
class Job:
  line: int
  output: Path | None
  txt: np.ndarray                  # (T, context_dim) float32
  y: np.ndarray | None
  neg_txt: np.ndarray | None
  neg_y: np.ndarray | None
  references: list[np.ndarray]     # each (H, W, 3) float32 in [-1, 1], resized to the target size
  masks: list[np.ndarray | None]   # each (H, W) bool or None
  request: SparseRequest           # how the references are thinned (strategy, budget, seed of `random`)
  size: tuple[int, int]
  steps: int
  guidance: float | None
  cfg_scale: float | None          # true classifier-free guidance with the negative prompt
  seed: int


@dataclasses.dataclass
class BadJob:
  line: int
  error: str


def _number(d, key, kind, default, low=None, high=None):
  value = d.get(key, default)
  if value is None:
    return None
  if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind is int and value != int(value)):
    raise ValueError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}")
  if (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"{key}={value} is outside [{low}, {high}]")
  return kind(value)


def _load_embeddings(path: Path, cfg: MMDiTConfig) -> dict[str, np.ndarray | None]:
  try:
    with np.load(path) as f:
      arrays = {k: np.asarray(f[k], np.float32) for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"prompt {path}: cannot read embeddings ({e})") from None
  if "txt" not in arrays or arrays["txt"].ndim != 2 or arrays["txt"].shape[1] != cfg.context_dim:
    raise ValueError(f"prompt {path}: needs txt of shape (T, {cfg.context_dim}), got "
                     f"{arrays['txt'].shape if 'txt' in arrays else 'none'}")
  for key in ("y", "neg_y"):
    if cfg.pooled_dim and key in arrays and arrays[key].shape != (cfg.pooled_dim,):
      raise ValueError(f"prompt {path}: {key} must have shape ({cfg.pooled_dim},), got {arrays[key].shape}")
  if cfg.pooled_dim and "y" not in arrays:
    raise ValueError(f"prompt {path}: this FLUX.1 model needs a pooled vector y ({cfg.pooled_dim},)")
  if "neg_txt" in arrays and arrays["neg_txt"].shape != arrays["txt"].shape:
    raise ValueError(f"prompt {path}: neg_txt {arrays['neg_txt'].shape} must match txt {arrays['txt'].shape}")
  return {k: arrays[k] for k in ("txt", "y", "neg_txt", "neg_y") if k in arrays}


def make_job(cfg: MMDiTConfig, *, line: int, output: Path | None, embeddings: dict, references: list[np.ndarray],
             masks: list[np.ndarray | None], request: SparseRequest, size: tuple[int, int], steps: int = 28,
             guidance: float | None = None, cfg_scale: float | None = None, seed: int = 0) -> Job:
  """A job from its parts (the one constructor, for job files and code alike); ValueError on what does not fit the
  model. embeddings: txt (T, D), and y / neg_txt / neg_y as the model and the CFG need."""
  if guidance is not None and not cfg.guidance_embed:
    raise ValueError("guidance given, but this model has no guidance embedder (use cfg for true CFG)")
  if guidance is None and cfg.guidance_embed:
    guidance = 3.5
  if cfg_scale is not None and embeddings.get("neg_txt") is None:
    raise ValueError("cfg needs a negative prompt: neg_txt in the prompt embeddings")
  if len(masks) != len(references):
    raise ValueError(f"{len(masks)} masks for {len(references)} references")
  neg_y = embeddings.get("neg_y")
  return Job(line=line, output=output, txt=embeddings["txt"], y=embeddings.get("y"),
             neg_txt=embeddings.get("neg_txt"), neg_y=neg_y if neg_y is not None else embeddings.get("y"),
             references=references, masks=masks, request=request, size=tuple(size), steps=steps, guidance=guidance,
             cfg_scale=cfg_scale, seed=seed)


def parse_job(d, line: int, base: Path, cfg: MMDiTConfig, max_refs: int, force: bool) -> Job:
  if not isinstance(d, dict):
    raise ValueError("a job must be a JSON object")
  unknown = sorted(set(d) - FIELDS)
  if unknown:
    raise ValueError(f"unknown field(s) {unknown}; expected some of {sorted(FIELDS)}")
  for key in ("prompt", "references", "output"):
    if key not in d:
      raise ValueError(f"missing field {key!r}")
  output = base / d["output"]
  if output.exists() and not force:
    raise ValueError(f"output {output} exists (pass --force to overwrite)")
  size = d.get("size", [512, 512])
  if (not isinstance(size, list) or len(size) != 2
      or any(not isinstance(s, int) or s <= 0 or s % TOKEN_PIXELS for s in size)):
    raise ValueError(f"size={size!r} must be [H, W], positive multiples of {TOKEN_PIXELS}")
  refs = d["references"]
  if not isinstance(refs, list) or not 1 <= len(refs) <= max_refs:
    raise ValueError(f"references must be a list of 1 to {max_refs} image paths"
                     + (" (FLUX.1 Kontext takes one)" if cfg.family == "flux1" else ""))
  masks = d.get("masks") or [None] * len(refs)
  task = d.get("task", "editing")
  if task not in TASK_STRATEGY:
    raise ValueError(f"task={task!r}; expected one of {sorted(TASK_STRATEGY)}")
  if "keep" in d and "tau" in d:
    raise ValueError("give keep or tau, not both")
  keep, tau = _number(d, "keep", float, None, 1e-9, 1.0), _number(d, "tau", float, None, 1e-9, 1.0)
  if keep is None and tau is None:
    keep = 1.0   # dense references
  seed = _number(d, "seed", int, 0, 0)
  request = SparseRequest(d.get("strategy", TASK_STRATEGY[task][0]), keep=keep, tau=tau,
                          hybrid_base=TASK_STRATEGY[task][1], seed=seed)
  guidance, cfg_scale = _number(d, "guidance", float, None, 0.0), _number(d, "cfg", float, None, 0.0)
  embeddings = _load_embeddings(base / d["prompt"], cfg)
  H, W = size
  pixels, mask_arrays = [], []
  for i, (r, m) in enumerate(zip(refs, masks)):
    try:
      pixels.append(unit_range(resize_crop(load_image(base / r), (H, W))))
      mask_arrays.append(None if m is None else resize_crop(load_mask(base / m), (H, W)) > 127)
    except ImageError as e:
      raise ValueError(f"reference {i} ({r if m is None else r + ' / ' + m}): {e}") from None
  if "mask" in request.strategies and any(m is None for m in mask_arrays):
    raise ValueError(f"strategy {request.strategy!r} needs a mask for every reference")
  return make_job(cfg, line=line, output=output, embeddings=embeddings, references=pixels, masks=mask_arrays,
                  request=request, size=(H, W), steps=_number(d, "steps", int, 28, 1, 1000), guidance=guidance,
                  cfg_scale=cfg_scale, seed=seed)


def read_jobs(path: str | Path, cfg: MMDiTConfig, max_refs: int, force: bool = False):
  """(jobs, bad jobs) of a JSONL file; every line is parsed and checked, bad ones are reported with the reason."""
  path = Path(path)
  jobs, bad = [], []
  for line, text in enumerate(path.read_text().splitlines(), start=1):
    if not text.strip():
      continue
    try:
      jobs.append(parse_job(json.loads(text), line, path.parent, cfg, max_refs, force))
    except json.JSONDecodeError as e:
      bad.append(BadJob(line, f"not valid JSON ({e.msg})"))
    except ValueError as e:
      bad.append(BadJob(line, str(e)))
  outputs = {}
  for j in jobs:
    if j.output in outputs:
      bad.append(BadJob(j.line, f"output {j.output} is also the output of line {outputs[j.output]}"))
    outputs.setdefault(j.output, j.line)
  taken = {b.line for b in bad}
  return [j for j in jobs if j.line not in taken], sorted(bad, key=lambda b: b.line)
