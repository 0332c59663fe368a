"""The main job until batch generation lands: the real presets abstractly, then a small FLUX.2-style model run
dense and with sparse references, timed, with XLA's FLOP count of each compiled program.

The references are procedural images (discs and bars on a flat ground); their latents are random (the VAE lands
with batch generation). Tokens are chosen per reference by `--strategy`, either at a fixed `--keep` ratio or with
an adaptive budget `--tau`, padded to a bucket of the ladder and masked with `img_lengths`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.cli import UserError
from sparse_context_jax.commands.presets import table
from sparse_context_jax.model import MMDiT, preset
from sparse_context_jax.model.jitted import JittedMMDiT, flops
from sparse_context_jax.model.positions import text_ids
from sparse_context_jax.sparse import STRATEGIES, Reference, SparsePacker, SparseRequest, dense_inputs
from sparse_context_jax.sparse.compare import median_seconds


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


def _check(args) -> None:
  problems = []
  if args.hidden <= 0 or args.hidden % 128:
    problems.append(f"--hidden {args.hidden} (expected a positive multiple of 128: heads of 128)")
  if min(args.depth) < 0 or sum(args.depth) == 0:
    problems.append(f"--depth {args.depth} (expected non-negative counts, not both zero)")
  if args.size <= 0 or args.size % 16:
    problems.append(f"--size {args.size} (expected a positive multiple of 16)")
  if not 1 <= args.refs <= 4:
    problems.append(f"--refs {args.refs} (expected 1 to 4)")
  for name in ("keep", "tau"):
    value = getattr(args, name)
    if value is not None and not 0 < value <= 1:
      problems.append(f"--{name} {value} (expected a ratio in (0, 1])")
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
  if not args.skip_presets:
    print("Released FLUX architectures (built abstractly with jax.eval_shape; no weights allocated):")
    print(table())
    print()

  cfg = preset("flux2-klein-9b").replace(num_heads=args.hidden // 128, depth_double=args.depth[0],
                                         depth_single=args.depth[1], context_dim=3 * args.hidden)
  model = JittedMMDiT(MMDiT(cfg, rngs=nnx.Rngs(args.seed)))
  rng = np.random.default_rng(args.seed)
  B, size, n = args.batch, (args.size, args.size), (args.size // 16) ** 2
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
  outputs, base = {}, None
  for name, x, packed in runs:
    kw = {**x, **common}
    compiled = model.compiled(**kw)
    seconds, f = median_seconds(lambda: model(**kw), args.repeats, warmup=2), flops(compiled)
    outputs[name] = np.asarray(model(**kw))[:, :n]
    base = base or (seconds, f)
    valid = np.asarray(x.get("img_lengths", [x["img"].shape[1]] * B))
    bucket = "-" if packed is None else f"{packed.bucket:.3g}"
    print(f"{name:<22} {bucket:>6} {x['img'].shape[1]:>7} ({', '.join(str(int(v)) for v in valid):>12}) "
          f"{model.compile_seconds(**kw):>9.2f} {1e3 * seconds:>9.2f} {f / 1e9:>9.3f} {base[0] / seconds:>7.2f}x "
          f"{base[1] / f:>5.2f}x")
  dense_out = outputs["dense"]
  keep1 = np.max(np.abs(outputs[runs[1][0]] - dense_out))
  change = np.max(np.abs(outputs[runs[2][0]] - dense_out)) / np.max(np.abs(dense_out))
  print(f"\nkept reference tokens per example: {sparse.kept.tolist()} of {n} each; padding waste "
        f"{100 * sparse.padding_waste:.1f}%")
  print(f"keep 1 through the padded path vs dense, target outputs: max |diff| = {keep1:.2e} "
        f"(max |out| = {np.max(np.abs(dense_out)):.2f})")
  print(f"sparse vs dense target outputs (random weights, untrained for sparsity): relative change {change:.2e}")
  return 0

