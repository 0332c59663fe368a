"""`generate JOBS.jsonl`: reference-conditioned batch generation with sparse references (job format:
`sparse_context_jax/generate/jobs.py`). Writes each job's PNG and a JSON report.

Every job is validated before any model is built (a bad line is reported with its reason and the others run);
text prompts are encoded in batches before the denoising batches (the text encoder is then freed, unless
`--keep-text-encoder`); a job that fails later (a full disk, a decode error) is reported and the others run. The
report is always written (atomically). Exit status: 0 when every job produced its PNG, 1 when some did not, 2 on
a user error of the command itself.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sparse_context_jax.cli import UserError
from sparse_context_jax.convert import (CheckpointError, is_converted_pipeline, load_model, load_vae, pipeline_components,
                                       read_config)
from sparse_context_jax.convert.lora_in import merge_loras, read_lora
from sparse_context_jax.convert.output import atomic_output
from sparse_context_jax.convert.run import is_run, open_run
from sparse_context_jax.encoders import records
from sparse_context_jax.encoders.records import unknown
from sparse_context_jax.encoders.vae import VAEImageEncoder
from sparse_context_jax.generate import BadJob, Failed, Generator, Pipeline, read_jobs
from sparse_context_jax.generate.prompts import encode_job_prompts
from sparse_context_jax.images import encode_png
from sparse_context_jax.model import PRESETS, MMDiT, MMDiTConfig
from sparse_context_jax.model.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from sparse_context_jax.progress import progress
from sparse_context_jax.sparse.pack import default_max_refs


def add_arguments(parser) -> None:
  parser.add_argument("jobs", metavar="JOBS.jsonl", help="one job per line (see sparse_context_jax/generate/jobs.py)")
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--model", metavar="DIR", help="a transformer converted with `convert`, a converted pipeline "
                     "folder (its VAE and text encoder(s) serve unless --vae / --text-encoder name others), or a "
                     "training run (RUN_DIR or RUN_DIR/checkpoints/STEP: the encoders it trained with serve "
                     "likewise)")
  model.add_argument("--random-model", metavar="PRESET|CONFIG_JSON",
                     help="random weights of a preset or of an MMDiTConfig JSON file (for timing and tests)")
  parser.add_argument("--step", type=int, metavar="N", help="with a training run as --model: the weights of step N "
                      "(default: its latest)")
  parser.add_argument("--ema", action="store_true", help="with a training run as --model: its EMA weights")
  parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", type=_lora_arg,
                      help="a FLUX LoRA .safetensors file (diffusers/peft, kohya or BFL/ComfyUI names) merged into "
                      "the transformer's weights at SCALE (default 1.0); repeatable, the LoRAs add up")
  vae = parser.add_mutually_exclusive_group()
  vae.add_argument("--vae", metavar="DIR", help="a VAE converted with `convert`")
  vae.add_argument("--random-vae", metavar="flux1|flux2|CONFIG_JSON", help="random VAE weights")
  text = parser.add_mutually_exclusive_group()
  text.add_argument("--text-encoder", nargs="+", metavar="DIR", help="converted text encoder(s) for text prompts: "
                    "one Qwen3 / Mistral folder, or T5 and CLIP (FLUX.1)")
  text.add_argument("--random-text-encoder", action="store_true",
                    help="a random-weights text encoder of the model's family with a tiny tokenizer (offline runs)")
  parser.add_argument("--max-sequence-length", type=int, default=512, help="text tokens per prompt (longer ones "
                      "are truncated with a warning naming the job line)")
  parser.add_argument("--text-batch-size", type=int, default=8, help="prompts per text-encoder call")
  parser.add_argument("--keep-text-encoder", action="store_true",
                      help="keep the text encoder in memory while denoising (default: freed after the prompts)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--batch-size", type=int, default=4, help="jobs per compiled batch")
  parser.add_argument("--report", metavar="PATH", help="JSON report (default: JOBS.report.json)")
  parser.add_argument("--save-latents", action="store_true", help="also write each job's final latents (.npy)")
  parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
  parser.add_argument("--seed", type=int, default=0, help="initialisation seed of the --random-* weights")


def _lora_arg(text: str) -> tuple[str, float]:
  """FILE[:SCALE] -> (FILE, SCALE); a suffix after the last ':' that is not a number belongs to the file name."""
  head, sep, tail = text.rpartition(":")
  if sep and head:
    try:
      return head, float(tail)
    except ValueError:
      pass
  return text, 1.0


def _random_config(spec: str, presets: dict, cls, what: str):
  if spec in presets:
    return presets[spec]
  try:
    d = json.loads(Path(spec).read_text())
    return cls.from_dict({k: v for k, v in d.items() if k != "kind"})
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"--random-{what} {spec}: neither a preset ({', '.join(sorted(presets))}) nor a readable "
                    f"config JSON ({e})") from None


def _resolve_folders(args) -> None:
  """A converted pipeline folder as --model: its transformer, and its VAE and text encoder(s) where the flags name
  none; a training run likewise: its weights, and the encoders it recorded (`encoders/records.py`). Leaves
  args.model naming a converted folder or a run (`args.run`: its opened step), args.vae and args.text_encoder
  single converted folders, or args.image_record / args.text_record a run's stand-in encoders."""
  args.run, args.image_record, args.text_record = None, None, None
  if args.model and is_run(args.model):
    _resolve_run(args)
  elif args.step is not None or args.ema:
    raise UserError("--step and --ema select the weights of a training run: give one as --model RUN_DIR")
  if args.model and is_converted_pipeline(args.model):
    try:
      components = pipeline_components(args.model)
    except CheckpointError as e:
      raise UserError(str(e)) from None
    if "transformer" not in components:
      raise UserError(f"--model {args.model}: a converted pipeline without a transformer")
    root, args.model = args.model, str(components["transformer"])
    if not (args.vae or args.random_vae) and "vae" in components:
      args.vae = str(components["vae"])
    if not (args.text_encoder or args.random_text_encoder) and "text_encoder" in components:
      args.text_encoder = [root]   # the prompt encoder finds the pipeline's encoders and tokenizers
  if not (args.vae or args.random_vae or args.image_record):
    raise UserError("give --vae DIR or --random-vae (or a converted pipeline folder with a VAE as --model)")


def _resolve_run(args) -> None:
  """A training run as --model: its step opened (errors now, before any job is read), its encoders where the flags
  name none."""
  try:
    args.run = open_run(args.model, step=args.step, ema=args.ema)
  except CheckpointError as e:
    raise UserError(str(e)) from None
  record = args.run.encoders or _encoders_of_config(args.run)
  where = f"--model {args.model}"
  if not (args.vae or args.random_vae):
    image = record.get("image", unknown("unrecorded"))
    if image.get("kind") == "vae":
      args.vae = image["path"]
    elif image.get("kind") == "pixel-tokens":
      args.image_record = image
    else:
      raise UserError(f"{where}: the run records no image encoder it can rebuild ({image.get('name')!r}): give "
                      "--vae DIR")
  if not (args.text_encoder or args.random_text_encoder):
    text = record.get("text", {})
    if text.get("kind") == "text-encoder":
      args.text_encoder = text["paths"]
    elif text.get("kind") == "hashed-text":
      args.text_record = text


def _encoders_of_config(run) -> dict:
  """The encoders of a run that recorded none (trained before runs wrote `encoders.json`), as its stored config
  names them (`train.batches.run_encoder_record`); unknown ones where its latent folder is gone."""
  import ml_collections
  from sparse_context_jax.train.batches import run_encoder_record
  try:
    return run_encoder_record(ml_collections.ConfigDict(run.config), run.model)
  except (OSError, KeyError, AttributeError, ValueError):
    return {}


def _model_config(args) -> MMDiTConfig:
  """The transformer's config, read without building it (jobs are checked against it first)."""
  if args.random_model:
    return _random_config(args.random_model, PRESETS, MMDiTConfig, "model")
  if args.run is not None:
    return args.run.model
  try:
    cfg = read_config(args.model)
  except CheckpointError as e:
    raise UserError(str(e)) from None
  if not isinstance(cfg, MMDiTConfig):
    raise UserError(f"--model {args.model} is a converted {type(cfg).__name__}, not a transformer")
  return cfg


def _write(path: Path, data: bytes) -> None:
  """Written beside `path` and renamed: a reader never sees half a file. (Whether `path` may be replaced was
  decided per job, by `--force`, before anything ran.)"""
  with atomic_output(path, force=True, directory=False) as tmp:
    tmp.write_bytes(data)


def _peak_rss_mib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _prompt_encoder(args, cfg: MMDiTConfig):
  """The text encoder the flags name, or None."""
  if args.text_record is not None:
    return records.text_encoder(args.text_record)
  if not (args.random_text_encoder or args.text_encoder):
    return None
  from sparse_context_jax.encoders.prompts import load_prompt_encoder, random_prompt_encoder
  try:
    if args.random_text_encoder:
      return random_prompt_encoder(cfg, seed=args.seed + 2)
    return load_prompt_encoder(*args.text_encoder, dtype=jnp.dtype(args.dtype))
  except (CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None


def run(args) -> int:
  import sparse_context_jax.compile_cache as compile_cache
  compile_cache.enable()
  for name in ("batch_size", "text_batch_size", "max_sequence_length"):
    if getattr(args, name) <= 0:
      raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} (expected > 0)")
  jobs_path = Path(args.jobs)
  if not jobs_path.is_file():
    raise UserError(f"jobs file {args.jobs} does not exist" if not jobs_path.exists() else
                    f"jobs file {args.jobs} is not a file")
  report_path = Path(args.report or jobs_path.with_suffix(".report.json"))
  _resolve_folders(args)
  cfg = _model_config(args)

  # ---- Every job checked before any model is built ------------------------------------------------------------
  try:
    jobs, bad = read_jobs(jobs_path, cfg, default_max_refs(cfg), force=args.force)
  except ValueError as e:
    raise UserError(str(e)) from None
  report = {"jobs": [], "bad_jobs": [], "failed_jobs": [], "programs": [], "memory": {}}
  if args.run is not None:   # which weights of the run generated
    report["run"] = {"path": str(args.run.run_dir), "step": args.run.step, "ema": args.run.ema}

  def reject(items: list[BadJob]) -> None:
    for b in items:
      print(f"{args.jobs}:{b.line}: {b.error}", file=sys.stderr)
      report["bad_jobs"].append({"line": b.line, "error": b.error})

  reject(bad)
  try:   # every LoRA file read and checked against the model before anything runs
    loras = [(read_lora(path, cfg), scale) for path, scale in args.lora]
  except CheckpointError as e:
    raise UserError(str(e)) from None
  try:
    # ---- Text prompts, in batches, before the denoising batches ------------------------------------------------
    if any(j.needs_encoding for j in jobs):
      encoder = _prompt_encoder(args, cfg)
      jobs, bad, warnings = encode_job_prompts(jobs, encoder, max_sequence_length=args.max_sequence_length,
                                               batch_size=args.text_batch_size)
      for w in warnings:
        print(f"{args.jobs}:{w.line}: warning: {w.error}", file=sys.stderr)
      reject(bad)
      report["memory"]["peak_rss_mib_after_prompts"] = _peak_rss_mib()
      if not args.keep_text_encoder:
        del encoder
        gc.collect()   # its parameters go before the transformer's arrive
      report["memory"]["text_encoder_kept"] = bool(args.keep_text_encoder)
    if jobs:
      _generate(args, cfg, jobs, report, loras)
  finally:
    report["memory"]["peak_rss_mib"] = _peak_rss_mib()
    report["bad_jobs"].sort(key=lambda b: b["line"])
    _write(report_path, json.dumps(report, indent=1).encode())
  n_bad, n_failed = len(report["bad_jobs"]), len(report["failed_jobs"])
  samplers = sum(1 for p in report["programs"] if p["program"] == "sample")
  print(f"generated {len(report['jobs'])} image(s), {n_bad} bad job(s), {n_failed} failed job(s); {samplers} "
        f"sampling program(s); report {report_path}")
  return 1 if n_bad or n_failed else 0


def _generate(args, cfg: MMDiTConfig, jobs: list, report: dict, loras: list) -> None:
  dtype = jnp.dtype(args.dtype)
  try:
    if args.run is not None:   # the step opened before the jobs were read, even if the run has saved another since
      model = load_model(args.run.run_dir, dtype=dtype, step=args.run.step, ema=args.run.ema)
    else:
      model = load_model(args.model, dtype=dtype) if args.model else MMDiT(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype)
    if loras:
      report["lora"] = merge_loras(model, loras)
    pipeline = Pipeline(model, _image_encoder(args), mesh=Mesh(np.array(jax.devices()), ("data",)))
  except (CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None
  generator = Generator(pipeline, batch_size=args.batch_size)
  try:
    with progress(len(jobs), "generate", "img") as bar:
      for r in generator.run(jobs, progress=bar):
        if not isinstance(r, Failed):
          try:
            _write(r.job.output, encode_png(r.pixels))
            if args.save_latents:
              _write(r.job.output.with_suffix(".npy"), _npy(r.latents))
          except OSError as e:   # a full disk, a folder removed since validation: this job only
            r = Failed(r.job, f"cannot write {r.job.output}: {e.strerror or e}")
        if isinstance(r, Failed):
          print(f"{args.jobs}:{r.job.line}: failed: {r.error}", file=sys.stderr)
          report["failed_jobs"].append({"line": r.job.line, "output": str(r.job.output), "error": r.error})
          continue
        request = r.job.request
        report["jobs"].append({
            "line": r.job.line, "output": str(r.job.output), "strategy": request.strategy,
            "keep": request.keep, "tau": request.tau, "kept_tokens": r.prepared.kept,
            "bucket": r.prepared.plan.rung.ratio, "sequence": r.prepared.sequence, "valid": r.prepared.valid,
            "batch_size": r.batch_size, "batch_seconds": round(r.batch_seconds, 4),
            "kv_cache_bytes": generator.kv_cache_bytes(r.prepared)})
  finally:
    report["programs"] = pipeline.programs()


def _image_encoder(args):
  """The image encoder the flags (or the --model folder or run) name."""
  if args.image_record is not None:
    return records.image_encoder(args.image_record)
  vae = (load_vae(args.vae) if args.vae else
         AutoencoderKL(_random_config(args.random_vae, VAE_PRESETS, VAEConfig, "vae"), rngs=nnx.Rngs(args.seed + 1)))
  return VAEImageEncoder(vae)


def _npy(array: np.ndarray) -> bytes:
  import io
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()
