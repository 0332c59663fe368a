"""The main job: the real presets abstractly, a small FLUX.2-style model run dense and with sparse references
(timed, with XLA's FLOP count of each compiled program), then batch generation through the `generate` path.

In the timing part the references are procedural images (discs and bars on a flat ground) with random latents.
Tokens are chosen per reference by `--strategy`, either at a fixed `--keep` ratio or with an adaptive budget
`--tau`, padded to a bucket of the ladder and masked with `img_lengths`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.cli import UserError
from sparse_context_jax.commands.presets import table
from sparse_context_jax.model import MMDiT, preset
from sparse_context_jax.model.jitted import JittedMMDiT
from sparse_context_jax.model.positions import TOKEN_PIXELS, text_ids
from sparse_context_jax.sparse import STRATEGIES, Reference, SparsePacker, SparseRequest, dense_inputs
from sparse_context_jax.sparse.compare import interleaved_medians


def add_arguments(parser) -> None:
  parser.add_argument("--hidden", type=int, default=256, help="hidden size of the small model (multiple of 128)")
  parser.add_argument("--depth", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"),
                      help="double and single blocks of the small model")
  parser.add_argument("--size", type=int, default=256, help="target and reference side in pixels (multiple of 16)")
  parser.add_argument("--refs", type=int, default=2, help="number of reference images (1-4)")
  parser.add_argument("--strategy", default="hybrid", choices=STRATEGIES, help="token selection strategy")
  budget = parser.add_mutually_exclusive_group()
  budget.add_argument("--keep", type=float, default=None, help="keep ratio of reference tokens, in (0, 1] "
                      "(default 0.25 unless --tau)")
  budget.add_argument("--tau", type=float, default=None, help="adaptive budget: score mass to keep, in (0, 1]")
  parser.add_argument("--txt", type=int, default=64, help="text tokens")
  parser.add_argument("--batch", type=int, default=2, help="batch size")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per program")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip-presets", action="store_true", help="do not print the preset table")
  parser.add_argument("--images", type=int, default=4, help="synthetic-world jobs of the batch-generation part "
                      "(0 skips it)")
  parser.add_argument("--out", default="demo_out", help="folder for the generated PNGs")


def _check(args) -> None:
  problems = []
  if args.hidden <= 0 or args.hidden % 128:
    problems.append(f"--hidden {args.hidden} (expected a positive multiple of 128: heads of 128)")
  if min(args.depth) < 0 or sum(args.depth) == 0:
    problems.append(f"--depth {args.depth} (expected non-negative counts, not both zero)")
  if args.size <= 0 or args.size % TOKEN_PIXELS:
    problems.append(f"--size {args.size} (expected a positive multiple of {TOKEN_PIXELS})")
  if not 1 <= args.refs <= 4:
    problems.append(f"--refs {args.refs} (expected 1 to 4)")
  for name in ("keep", "tau"):
    value = getattr(args, name)
    if value is not None and not 0 < value <= 1:
      problems.append(f"--{name} {value} (expected a ratio in (0, 1])")
  if args.images < 0:
    problems.append(f"--images {args.images} (expected >= 0)")
  for name in ("txt", "batch", "repeats"):
    if getattr(args, name) <= 0:
      problems.append(f"--{name} {getattr(args, name)} (expected > 0)")
  if problems:
    raise UserError("; ".join(problems))


def procedural_image(rng: np.random.Generator, size: int) -> np.ndarray:
  """(size, size, 3) in [0, 1]: a flat ground with a few discs and bars of random colours, places and sizes."""
  img = np.ones((size, size, 3), np.float32) * rng.uniform(0.2, 0.8, 3).astype(np.float32)
  yy, xx = np.mgrid[0:size, 0:size]
  for _ in range(int(rng.integers(2, 5))):
    cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 16, size / 5)]
    shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2) if rng.random() < 0.5 else (
        (np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < r))
    img[shape] = rng.uniform(0, 1, 3)
  return img


def run(args) -> int:
  _check(args)
  import sparse_context_jax.compile_cache as compile_cache
  compile_cache.enable()
  if not args.skip_presets:
    print("Released FLUX architectures (built abstractly with jax.eval_shape; no weights allocated):")
    print(table())
    print()

  cfg = preset("flux2-klein-9b").replace(num_heads=args.hidden // 128, depth_double=args.depth[0],
                                         depth_single=args.depth[1], context_dim=3 * args.hidden)
  model = JittedMMDiT(MMDiT(cfg, rngs=nnx.Rngs(args.seed)))
  rng = np.random.default_rng(args.seed)
  B, size, n = args.batch, (args.size, args.size), (args.size // TOKEN_PIXELS) ** 2
  latents = lambda m: jnp.asarray(rng.standard_normal((B, m, cfg.in_channels)).astype(np.float32))
  target = latents(n)
  refs = [Reference(latents(n), size, pixels=np.stack([procedural_image(rng, args.size) for _ in range(B)]))
          for _ in range(args.refs)]
  common = dict(txt=jnp.asarray(rng.standard_normal((B, args.txt, cfg.context_dim)).astype(np.float32)),
                timesteps=jnp.asarray(rng.uniform(0, 1, B).astype(np.float32)),
                txt_ids=jnp.asarray(text_ids(cfg, args.txt)))
  budget = dict(tau=args.tau) if args.tau is not None else dict(keep=args.keep or 0.25)
  request = SparseRequest(args.strategy, **budget, seed=args.seed)
  packer = SparsePacker(cfg)

  img, ids = dense_inputs(cfg, target, size, refs)
  full = packer(target, size, refs, SparseRequest(args.strategy, keep=1.0, seed=args.seed))
  sparse = packer(target, size, refs, request)
  runs = [("dense", dict(img=img, img_ids=ids), None),
          ("keep 1, padded path", dict(img=full.img, img_ids=full.img_ids, img_lengths=full.img_lengths), full),
          (f"{args.strategy}, " + ", ".join(f"{k} {v:g}" for k, v in budget.items()),
           dict(img=sparse.img, img_ids=sparse.img_ids, img_lengths=sparse.img_lengths), sparse)]

  print(f"Small FLUX.2-style model: hidden {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}, "
        f"{cfg.depth_double} double + {cfg.depth_single} single blocks, "
        f"{sum(x.size for x in jax.tree.leaves(model.state)):,} parameters, float32 on {jax.devices()[0].platform}.")
  print(f"Batch {B}, text {args.txt} tokens, target {args.size}x{args.size} px ({n} tokens), {args.refs} "
        f"procedural reference image(s) of the same size.")
  print(f"\n{'run':<22} {'bucket':>6} {'image tokens (valid)':>22} {'compile s':>9} {'step ms':>9} {'GFLOP':>9} "
        f"{'speedup':>8} {'ideal':>6}")
  kws = {name: {**x, **common} for name, x, _ in runs}
  seconds = interleaved_medians({name: (lambda kw=kw: model(**kw)) for name, kw in kws.items()}, args.repeats,
                                warmup=2)
  outputs = {name: np.asarray(model(**kw))[:, :n] for name, kw in kws.items()}
  base = (seconds["dense"], model.flops(**kws["dense"]))
  for name, x, packed in runs:
    kw, f = kws[name], model.flops(**kws[name])
    valid = np.asarray(x.get("img_lengths", [x["img"].shape[1]] * B))
    bucket = "-" if packed is None else f"{packed.bucket:.3g}"
    print(f"{name:<22} {bucket:>6} {x['img'].shape[1]:>7} ({', '.join(str(int(v)) for v in valid):>12}) "
          f"{model.compile_seconds(**kw):>9.2f} {1e3 * seconds[name]:>9.2f} {f / 1e9:>9.3f} "
          f"{base[0] / seconds[name]:>7.2f}x {base[1] / f:>5.2f}x")
  dense_out = outputs["dense"]
  keep1 = np.max(np.abs(outputs[runs[1][0]] - dense_out))
  change = np.max(np.abs(outputs[runs[2][0]] - dense_out)) / np.max(np.abs(dense_out))
  print(f"\nkept reference tokens per example: {sparse.kept.tolist()} of {n} each; padding waste "
        f"{100 * sparse.padding_waste:.1f}%")
  print(f"keep 1 through the padded path vs dense, target outputs: max |diff| = {keep1:.2e} "
        f"(max |out| = {np.max(np.abs(dense_out)):.2f})")
  print(f"sparse vs dense target outputs (random weights, untrained for sparsity): relative change {change:.2e}")
  if args.images:
    _generation(args, model, cfg)
  return 0



def _generation(args, model: JittedMMDiT, cfg) -> None:
  """Batch generation of synthetic-world composition jobs (references, masks, captions with a known answer) through
  the path of the `generate` command: a JSONL jobs file with its reference and mask PNGs and text prompts is written
  to a temporary folder, read back by `read_jobs`, its prompts encoded by a random-weights Qwen3 text encoder with a
  tiny tokenizer (`generate --random-text-encoder`), and run by the `Generator` over a `Pipeline`, dense and then
  with the task-aware sparse default (hybrid: edges for editing, saliency for composition) at --keep. Random
  weights: the PNGs show the pipeline, not a model."""
  import json
  import tempfile
  import time
  from pathlib import Path

  from jax.sharding import Mesh

  from sparse_context_jax.data.world import example
  from sparse_context_jax.encoders.prompts import random_prompt_encoder
  from sparse_context_jax.encoders.vae import VAEImageEncoder
  from sparse_context_jax.generate import Generator, Pipeline, read_jobs
  from sparse_context_jax.generate.prompts import encode_job_prompts
  from sparse_context_jax.images import encode_png
  from sparse_context_jax.model.vae import AutoencoderKL, VAEConfig

  vae_cfg = VAEConfig(family="flux2", block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32,
                      norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=1.0,
                      shift_factor=0.0)
  pipeline = Pipeline(nnx.merge(model.graphdef, model.state),
                      VAEImageEncoder(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(args.seed + 1))),
                      mesh=Mesh(np.array(jax.devices()), ("data",)))
  gen = Generator(pipeline, batch_size=2)
  text_encoder = random_prompt_encoder(cfg, seed=args.seed + 2)
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  keep = args.keep or 0.25
  print(f"\nBatch generation: {args.images} synthetic-world composition jobs with {args.refs} reference(s) of "
        f"{args.size}x{args.size}, 4 steps, batches of 2, a small random VAE, text prompts (their captions) through "
        f"{text_encoder.name}; PNGs in {out}/")
  print(f"{'references':<28} {'kept tokens (first job)':>24} {'images/s':>9} {'speedup':>8}")
  with tempfile.TemporaryDirectory() as tmp:   # the jobs files and their inputs; the PNGs go to --out
    jobs_dir = Path(tmp)
    lines = {"dense": [], "sparse": []}
    for i in range(args.images):
      ex = example(args.seed, i, (args.size, args.size), max_refs=args.refs, min_refs=args.refs,
                   tasks=("composition",))
      refs, masks = [], []
      for r, (pixels, mask) in enumerate(zip(ex.references, ex.masks)):
        for name, data, kind in ((f"ref{i}_{r}.png", pixels, refs), (f"mask{i}_{r}.png", mask, masks)):
          (jobs_dir / name).write_bytes(encode_png(data))
          kind.append(name)
      for label, budget in (("dense", 1.0), ("sparse", keep)):
        lines[label].append({"prompt": ex.caption, "references": refs, "masks": masks, "task": ex.task,
                             "keep": budget, "size": [args.size, args.size], "steps": 4, "seed": i,
                             "output": str(out / f"{label}_{i}.png")})
    base = None
    for label, name in (("dense", "dense"), (f"hybrid/saliency, keep {keep:g}", "sparse")):
      path = jobs_dir / f"{name}.jsonl"
      path.write_text("".join(json.dumps(line) + "\n" for line in lines[name]))
      jobs, bad = read_jobs(path, cfg, pipeline.packer.max_refs, force=True)
      jobs, bad_prompts, _ = encode_job_prompts(jobs, text_encoder, max_sequence_length=args.txt, batch_size=2)
      if bad or bad_prompts:
        raise AssertionError(f"the demo's own jobs are invalid: {bad + bad_prompts}")
      gen.run_batch([gen.prepare(jobs[0])])            # compile
      t0 = time.perf_counter()
      results = list(gen.run(jobs))
      per_s = len(results) / (time.perf_counter() - t0)
      for r in results:
        r.job.output.write_bytes(encode_png(r.pixels))
      base = base or per_s
      print(f"{label:<28} {str(results[0].prepared.kept):>24} {per_s:>9.2f} {per_s / base:>7.2f}x")
