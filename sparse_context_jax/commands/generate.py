"""`generate JOBS.jsonl`: reference-conditioned batch generation with sparse references (job format:
`sparse_context_jax/generate/jobs.py`). Writes each job's PNG and a JSON report; bad jobs are reported by line
and the others still run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from sparse_context_jax.cli import UserError
from sparse_context_jax.convert import CheckpointError, load_model, load_vae
from sparse_context_jax.convert.output import atomic_output
from sparse_context_jax.encoders.vae import VAEImageEncoder
from sparse_context_jax.generate import Generator, Pipeline, read_jobs
from sparse_context_jax.images import encode_png
from sparse_context_jax.model import PRESETS, MMDiT, MMDiTConfig
from sparse_context_jax.model.vae import VAE_PRESETS, AutoencoderKL, VAEConfig


def add_arguments(parser) -> None:
  parser.add_argument("jobs", metavar="JOBS.jsonl", help="one job per line (see sparse_context_jax/generate/jobs.py)")
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--model", metavar="DIR", help="a transformer converted with `convert`")
  model.add_argument("--random-model", metavar="PRESET|CONFIG_JSON",
                     help="random weights of a preset or of an MMDiTConfig JSON file (for timing and tests)")
  vae = parser.add_mutually_exclusive_group(required=True)
  vae.add_argument("--vae", metavar="DIR", help="a VAE converted with `convert`")
  vae.add_argument("--random-vae", metavar="flux1|flux2|CONFIG_JSON", help="random VAE weights")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--batch-size", type=int, default=4, help="jobs per compiled batch")
  parser.add_argument("--report", metavar="PATH", help="JSON report (default: JOBS.report.json)")
  parser.add_argument("--save-latents", action="store_true", help="also write each job's final latents (.npy)")
  parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
  parser.add_argument("--seed", type=int, default=0, help="initialisation seed of --random-model / --random-vae")


def _random(spec: str, presets: dict, cls, what: str):
  if spec in presets:
    return presets[spec]
  try:
    d = json.loads(Path(spec).read_text())
    return cls.from_dict({k: v for k, v in d.items() if k != "kind"})
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"--random-{what} {spec}: neither a preset ({', '.join(sorted(presets))}) nor a readable "
                    f"config JSON ({e})") from None


def _write(path: Path, data: bytes) -> None:
  """Written beside `path` and renamed: a reader never sees half a PNG. (Whether `path` may be replaced was
  decided per job, by `--force`, before anything ran.)"""
  with atomic_output(path, force=True, directory=False) as tmp:
    tmp.write_bytes(data)


def run(args) -> int:
  if args.batch_size <= 0:
    raise UserError(f"--batch-size {args.batch_size} (expected > 0)")
  if not Path(args.jobs).is_file():
    raise UserError(f"jobs file {args.jobs} does not exist")
  dtype = jnp.dtype(args.dtype)
  try:
    model = (load_model(args.model, dtype=dtype) if args.model else
             MMDiT(_random(args.random_model, PRESETS, MMDiTConfig, "model"), rngs=nnx.Rngs(args.seed), dtype=dtype))
    vae = (load_vae(args.vae) if args.vae else
           AutoencoderKL(_random(args.random_vae, VAE_PRESETS, VAEConfig, "vae"), rngs=nnx.Rngs(args.seed + 1)))
    pipeline = Pipeline(model, VAEImageEncoder(vae), mesh=Mesh(np.array(jax.devices()), ("data",)))
  except (CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None
  generator = Generator(pipeline, batch_size=args.batch_size)

  jobs, bad = read_jobs(args.jobs, model.config, pipeline.packer.max_refs, force=args.force)
  for b in bad:
    print(f"{args.jobs}:{b.line}: {b.error}", file=sys.stderr)
  report = {"jobs": [], "bad_jobs": [{"line": b.line, "error": b.error} for b in bad]}
  with tqdm(total=len(jobs), desc="generate", unit="img", disable=not sys.stderr.isatty()) as bar:
    for r in generator.run(jobs, progress=bar):
      _write(r.job.output, encode_png(r.pixels))
      if args.save_latents:
        with open(r.job.output.with_suffix(".npy"), "wb") as f:
          np.save(f, r.latents)
      request = r.job.request
      report["jobs"].append({
          "line": r.job.line, "output": str(r.job.output), "strategy": request.strategy,
          "keep": request.keep, "tau": request.tau, "kept_tokens": r.prepared.kept,
          "bucket": r.prepared.plan.rung.ratio, "sequence": r.prepared.sequence, "valid": r.prepared.valid,
          "batch_size": r.batch_size, "batch_seconds": round(r.batch_seconds, 4)})
  report["programs"] = pipeline.programs()
  report_path = Path(args.report or Path(args.jobs).with_suffix(".report.json"))
  _write(report_path, json.dumps(report, indent=1).encode())
  print(f"generated {len(report['jobs'])} image(s), {len(bad)} bad job(s); "
        f"{sum(1 for p in report['programs'] if p['program'] == 'sample')} sampling program(s); report {report_path}")
  return 1 if bad else 0
