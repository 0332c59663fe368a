"""Generation jobs: one JSON object per line of a JSONL file, every line validated before any model is built.

    {"prompt": "a cat on a sofa",         # text, encoded by the text encoder (or "prompt_embeds": "cat.npz")
     "negative_prompt": "blurry",         # optional, for true CFG ("cfg"); default "" as the FLUX.2 pipelines
     "references": ["a.png", "b.png"],    # 1..max_refs images (FLUX.1 Kontext: one), any size and mode
     "masks": ["m.png", null],            # optional, one per reference, the size of its reference
     "task": "editing",                   # "editing" or "composition": picks the default strategy
     "strategy": "edge", "keep": 0.25,    # or "tau": 0.6; neither: dense references (keep 1)
     "attention_blocks": [0, 4, 7],       # strategy "attention": double blocks to average (default: 3, spread)
     "size": [512, 512],                  # target (H, W), multiples of 16, at most MAX_PIXELS; references are
                                          # resized (centre crop) to it
     "steps": 4, "guidance": 3.5, "cfg": 4.0, "seed": 0,
     "output": "out/cat.png"}

`prompt_embeds` is an `.npz` of txt (T, context_dim); y (pooled_dim) for FLUX.1; neg_txt (and neg_y) for true CFG.
Relative paths are relative to the JSONL file's folder. Validation decodes every image and mask, creates every
output folder and checks it is writable; pixels are read again when a job runs, so memory does not grow with the
jobs file. Every job, from a file or from code, is built by `make_job`, which checks what depends on the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from sparse_context_jax.encoders.base import unit_range
from sparse_context_jax.images import ImageError, load_image, load_mask, resize_crop
from sparse_context_jax.model.attention_mass import resolve_blocks
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.positions import TOKEN_PIXELS
from sparse_context_jax.sparse.pack import SparseRequest

TASK_STRATEGY = {"editing": ("hybrid", "edge"), "composition": ("hybrid", "saliency")}
FIELDS = {"prompt", "negative_prompt", "prompt_embeds", "references", "masks", "task", "strategy", "keep", "tau",
          "size", "steps", "guidance", "cfg", "seed", "output", "attention_blocks"}
MAX_PIXELS = 4 * 1024 * 1024   # per generated image: the FLUX.2 pipelines' 4-megapixel limit


@dataclasses.dataclass
class Job:
  """One validated job. Its prompt is text (`prompt`, encoded later: `with_embeddings`) or embeddings (`txt`)."""

  line: int
  output: Path | None
  txt: np.ndarray | None           # (T, context_dim) float32; None until a text prompt is encoded
  y: np.ndarray | None
  neg_txt: np.ndarray | None
  neg_y: np.ndarray | None
  references: list                 # each an image path, or (H, W, 3) float32 pixels in [-1, 1] of the target size
  masks: list                      # each a mask path, an (H, W) bool array, or None
  request: SparseRequest           # how the references are thinned (strategy, budget, seed of `random`)
  size: tuple[int, int]
  steps: int
  guidance: float | None
  cfg_scale: float | None          # true classifier-free guidance with the negative prompt
  seed: int
  prompt: str | None = None        # the text, for jobs whose prompt the text encoder encodes
  negative_prompt: str | None = None

  @property
  def needs_encoding(self) -> bool:
    return self.txt is None

  def reference_pixels(self) -> list[np.ndarray]:
    """Each reference as (H, W, 3) float32 in [-1, 1] of the target size (read from its file if it is a path)."""
    return [unit_range(resize_crop(load_image(r), self.size)) if isinstance(r, Path) else r
            for r in self.references]

  def mask_arrays(self) -> list[np.ndarray | None]:
    """Each mask as (H, W) bool of the target size, or None."""
    return [resize_crop(load_mask(m), self.size) > 127 if isinstance(m, Path) else m for m in self.masks]

  def with_embeddings(self, txt, y=None, neg_txt=None, neg_y=None) -> "Job":
    """The job with its text prompt encoded (arrays of one prompt: txt (T, D), y (P,) for FLUX.1)."""
    return dataclasses.replace(self, txt=txt, y=y, neg_txt=neg_txt, neg_y=neg_y if neg_y is not None else y)


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


def _load_embeddings(path: Path, cfg: MMDiTConfig) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as f:
      arrays = {k: np.asarray(f[k], np.float32) for k in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"prompt_embeds {path}: cannot read embeddings ({e})") from None
  if "txt" not in arrays or arrays["txt"].ndim != 2 or arrays["txt"].shape[1] != cfg.context_dim:
    raise ValueError(f"prompt_embeds {path}: needs txt of shape (T, {cfg.context_dim}), got "
                     f"{arrays['txt'].shape if 'txt' in arrays else 'none'}")
  for key in ("y", "neg_y"):
    if cfg.pooled_dim and key in arrays and arrays[key].shape != (cfg.pooled_dim,):
      raise ValueError(f"prompt_embeds {path}: {key} must have shape ({cfg.pooled_dim},), got {arrays[key].shape}")
  if cfg.pooled_dim and "y" not in arrays:
    raise ValueError(f"prompt_embeds {path}: this FLUX.1 model needs a pooled vector y ({cfg.pooled_dim},)")
  if "neg_txt" in arrays and arrays["neg_txt"].shape != arrays["txt"].shape:
    raise ValueError(f"prompt_embeds {path}: neg_txt {arrays['neg_txt'].shape} must match txt "
                     f"{arrays['txt'].shape}")
  bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
  if bad:
    raise ValueError(f"prompt_embeds {path}: {', '.join(sorted(bad))} hold NaN or infinite values")
  return {k: arrays[k] for k in ("txt", "y", "neg_txt", "neg_y") if k in arrays}


def make_job(cfg: MMDiTConfig, *, line: int, output: Path | None, references: list, masks: list,
             request: SparseRequest, size: tuple[int, int], embeddings: dict | None = None, prompt: str | None = None,
             negative_prompt: str | None = None, steps: int = 28, guidance: float | None = None,
             cfg_scale: float | None = None, seed: int = 0) -> Job:
  """A job from its parts (the one constructor, for job files and code alike); ValueError on what does not fit the
  model. The prompt is `embeddings` (txt (T, D), and y / neg_txt / neg_y as the model and the CFG need) or the text
  `prompt` (and `negative_prompt`, default "" with CFG), encoded later. references / masks: paths or arrays (see
  `Job`)."""
  if (embeddings is None) == (prompt is None):
    raise ValueError("give the prompt as text (prompt) or as embeddings (prompt_embeds), exactly one")
  if negative_prompt is not None and prompt is None:
    raise ValueError("negative_prompt goes with a text prompt; with prompt_embeds put neg_txt in the file")
  if guidance is not None and not cfg.guidance_embed:
    raise ValueError("guidance given, but this model has no guidance embedder (use cfg for true CFG)")
  if guidance is None and cfg.guidance_embed:
    guidance = 3.5
  if cfg_scale is not None and embeddings is not None and embeddings.get("neg_txt") is None:
    raise ValueError("cfg needs a negative prompt: neg_txt in the prompt embeddings")
  if cfg_scale is not None and prompt is not None and negative_prompt is None:
    negative_prompt = ""   # as the FLUX.2 pipelines
  if len(masks) != len(references):
    raise ValueError(f"{len(masks)} masks for {len(references)} references")
  if "attention" in request.strategies:
    resolve_blocks(cfg, request.attention_blocks)
  if size[0] * size[1] > MAX_PIXELS:
    raise ValueError(f"size={list(size)} is {size[0] * size[1] / 2**20:.1f} megapixels; at most "
                     f"{MAX_PIXELS / 2**20:g} (the FLUX.2 pipelines' limit)")
  e = embeddings or {}
  job = Job(line=line, output=output, txt=None, y=None, neg_txt=None, neg_y=None, references=list(references),
            masks=list(masks), request=request, size=tuple(size), steps=steps, guidance=guidance,
            cfg_scale=cfg_scale, seed=seed, prompt=prompt,
            negative_prompt=negative_prompt if cfg_scale is not None else None)
  return job if embeddings is None else job.with_embeddings(e["txt"], e.get("y"), e.get("neg_txt"), e.get("neg_y"))


def _check_output(output: Path, force: bool) -> None:
  """`output` can be written: not a folder, not existing (unless `force`), its folder created and writable."""
  if output.is_dir():
    raise ValueError(f"output {output} is a folder (expected a .png path)")
  if output.exists() and not force:
    raise ValueError(f"output {output} exists (pass --force to overwrite)")
  try:
    output.parent.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=output.parent).close()   # the folder takes a new file
  except OSError as e:
    raise ValueError(f"output {output}: its folder cannot be written ({e.strerror or e})") from None


def _check_images(refs: list[Path], masks: list[Path | None]) -> None:
  """Every reference and mask decodes; each mask has its reference's size (the rule of build-dataset)."""
  for i, (r, m) in enumerate(zip(refs, masks)):
    try:
      shape = load_image(r).shape[:2]
      if m is not None:
        mask_shape = load_mask(m).shape[:2]
        if mask_shape != shape:
          raise ValueError(f"mask {i} {m} is {mask_shape[0]}x{mask_shape[1]} (HxW), its reference {r} is "
                           f"{shape[0]}x{shape[1]}")
    except ImageError as e:
      raise ValueError(f"reference {i} ({r if m is None else f'{r} / {m}'}): {e}") from None


def parse_job(d, line: int, base: Path, cfg: MMDiTConfig, max_refs: int, force: bool) -> Job:
  if not isinstance(d, dict):
    raise ValueError("a job must be a JSON object")
  unknown = sorted(set(d) - FIELDS)
  if unknown:
    raise ValueError(f"unknown field(s) {unknown}; expected some of {sorted(FIELDS)}")
  for key in ("references", "output"):
    if key not in d:
      raise ValueError(f"missing field {key!r}")
  if ("prompt" in d) == ("prompt_embeds" in d):
    raise ValueError("give \"prompt\" (text) or \"prompt_embeds\" (an .npz of embeddings), exactly one")
  for key in ("prompt", "negative_prompt"):
    if key in d and not isinstance(d[key], str):
      raise ValueError(f"{key} must be a string, got {type(d[key]).__name__}")
  if "prompt" in d and d["prompt"].endswith(".npz") and (base / d["prompt"]).is_file():
    raise ValueError(f"prompt {d['prompt']!r} names an embeddings file: give it as \"prompt_embeds\" (\"prompt\" "
                     "is the text)")
  for key in ("output", "prompt_embeds"):
    if key in d and (not isinstance(d[key], str) or not d[key]):
      raise ValueError(f"{key} must be a path, got {d[key]!r}")
  output = base / d["output"]
  _check_output(output, force)
  size = d.get("size", [512, 512])
  if (not isinstance(size, list) or len(size) != 2
      or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 or s % TOKEN_PIXELS for s in size)):
    raise ValueError(f"size={size!r} must be [H, W], positive multiples of {TOKEN_PIXELS}")
  refs = d["references"]
  if not isinstance(refs, list) or not 1 <= len(refs) <= max_refs or not all(isinstance(r, str) for r in refs):
    raise ValueError(f"references must be a list of 1 to {max_refs} image paths"
                     + (" (FLUX.1 Kontext takes one)" if cfg.family == "flux1" else ""))
  masks = d.get("masks") or [None] * len(refs)
  if not isinstance(masks, list) or not all(m is None or isinstance(m, str) for m in masks):
    raise ValueError("masks must be a list of mask paths (or null), one per reference")
  task = d.get("task", "editing")
  if task not in TASK_STRATEGY:
    raise ValueError(f"task={task!r}; expected one of {sorted(TASK_STRATEGY)}")
  if "keep" in d and "tau" in d:
    raise ValueError("give keep or tau, not both")
  keep, tau = _number(d, "keep", float, None, 1e-9, 1.0), _number(d, "tau", float, None, 1e-9, 1.0)
  if keep is None and tau is None:
    keep = 1.0   # dense references
  seed = _number(d, "seed", int, 0, 0)
  blocks = d.get("attention_blocks")
  if blocks is not None and not isinstance(blocks, list):
    raise ValueError(f"attention_blocks={blocks!r} must be a list of double-block indices")
  request = SparseRequest(d.get("strategy", TASK_STRATEGY[task][0]), keep=keep, tau=tau,
                          hybrid_base=TASK_STRATEGY[task][1], seed=seed,
                          attention_blocks=None if blocks is None else tuple(blocks))
  if "mask" in request.strategies and any(m is None for m in masks):
    raise ValueError(f"strategy {request.strategy!r} needs a mask for every reference")
  guidance, cfg_scale = _number(d, "guidance", float, None, 0.0), _number(d, "cfg", float, None, 0.0)
  embeddings = _load_embeddings(base / d["prompt_embeds"], cfg) if "prompt_embeds" in d else None
  ref_paths = [base / r for r in refs]
  mask_paths = [None if m is None else base / m for m in masks]
  job = make_job(cfg, line=line, output=output, embeddings=embeddings, prompt=d.get("prompt"),
                 negative_prompt=d.get("negative_prompt"), references=ref_paths, masks=mask_paths, request=request,
                 size=tuple(size), steps=_number(d, "steps", int, 28, 1, 1000), guidance=guidance,
                 cfg_scale=cfg_scale, seed=seed)
  _check_images(ref_paths, mask_paths)   # last: the costliest check
  return job


def read_jobs(path: str | Path, cfg: MMDiTConfig, max_refs: int, force: bool = False):
  """(jobs, bad jobs) of a JSONL file; every line is parsed and checked, bad ones are reported with the reason.
  ValueError if the file cannot be read as UTF-8 text."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"jobs file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
  except OSError as e:
    raise ValueError(f"jobs file {path}: cannot read it ({e.strerror or e})") from None
  jobs, bad = [], []
  for line, text in enumerate(text.splitlines(), start=1):
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
    key = os.path.realpath(j.output)
    if key in outputs:
      bad.append(BadJob(j.line, f"output {j.output} is also the output of line {outputs[key]}"))
    outputs.setdefault(key, j.line)
  taken = {b.line for b in bad}
  return [j for j in jobs if j.line not in taken], sorted(bad, key=lambda b: b.line)
