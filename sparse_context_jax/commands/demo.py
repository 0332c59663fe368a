"""The main job until batch generation lands: the real presets abstractly, then a small FLUX.2-style model run
dense and with padded sparse references, timed, with XLA's FLOP count of each compiled program.

Sparse references here keep a seeded random subset of each reference's tokens (the training distribution),
with their original position ids, padded at the end to a fixed capacity and masked with `img_lengths`.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.cli import UserError
from sparse_context_jax.commands.presets import table
from sparse_context_jax.model import MMDiT, preset
from sparse_context_jax.model.positions import image_ids, reference_index, text_ids


def add_arguments(parser) -> None:
  parser.add_argument("--hidden", type=int, default=256, help="hidden size of the small model (multiple of 128)")
  parser.add_argument("--depth", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"),
                      help="double and single blocks of the small model")
  parser.add_argument("--grid", type=int, default=16, help="target and reference side in tokens (16 = 256 px)")
  parser.add_argument("--refs", type=int, default=2, help="number of reference images")
  parser.add_argument("--keep", type=float, default=0.25, help="keep ratio of reference tokens, in (0, 1]")
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
  if not 0 < args.keep <= 1:
    problems.append(f"--keep {args.keep} (expected a ratio in (0, 1])")
  for name in ("grid", "refs", "txt", "batch", "repeats"):
    if getattr(args, name) <= 0:
      problems.append(f"--{name} {getattr(args, name)} (expected > 0)")
  if problems:
    raise UserError("; ".join(problems))


def _sparse_inputs(cfg, dense: dict, n_target: int, ref_tokens: int, refs: int, keeps: list[float], rng) -> dict:
  """Keeps `ceil(keeps[b] * M)` random tokens of every reference of example b, in raster order with their dense
  ids, and pads every example at the end to the capacity of the largest keep ratio."""
  B = dense["img"].shape[0]
  capacity = refs * math.ceil(max(keeps) * ref_tokens)
  img = np.zeros((B, n_target + capacity, cfg.in_channels), np.float32)
  ids = np.zeros((B, n_target + capacity, cfg.n_axes), np.float32)
  lengths = np.zeros((B,), np.int32)
  for b in range(B):
    k = math.ceil(keeps[b] * ref_tokens)
    rows = [np.arange(n_target)]
    for i in range(refs):
      start = n_target + i * ref_tokens
      rows.append(start + np.sort(rng.choice(ref_tokens, size=k, replace=False)))
    rows = np.concatenate(rows)
    img[b, :len(rows)] = dense["img"][b, rows]
    ids[b, :len(rows)] = dense["img_ids"][rows]
    lengths[b] = len(rows)
  return {**dense, "img": img, "img_ids": ids, "img_lengths": lengths}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def _time(fn, state, inputs, repeats: int) -> tuple[float, float, float, jax.Array]:
  """(compile seconds, median step seconds, FLOPs, output)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(state, inputs).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(state, inputs))
  for _ in range(2):  # warm-up: thread pools and caches
    jax.block_until_ready(compiled(state, inputs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, inputs))
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times)), _flops(compiled), out


def run(args) -> int:
  _check(args)
  if not args.skip_presets:
    print("Released FLUX architectures (built abstractly with jax.eval_shape; no weights allocated):")
    print(table())
    print()

  base = preset("flux2-klein-9b")
  cfg = base.replace(num_heads=args.hidden // 128, depth_double=args.depth[0], depth_single=args.depth[1],
                     context_dim=3 * args.hidden)
  model = MMDiT(cfg, rngs=nnx.Rngs(args.seed))
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(**x)

  rng = np.random.default_rng(args.seed)
  g, n_target, B = args.grid, args.grid * args.grid, args.batch
  ids = [image_ids(cfg, g, g)] + [image_ids(cfg, g, g, reference_index(cfg, i)) for i in range(args.refs)]
  dense = {
      "img": rng.standard_normal((B, n_target * (1 + args.refs), cfg.in_channels)).astype(np.float32),
      "txt": rng.standard_normal((B, args.txt, cfg.context_dim)).astype(np.float32),
      "timesteps": rng.uniform(0, 1, B).astype(np.float32),
      "img_ids": np.concatenate(ids),
      "txt_ids": text_ids(cfg, args.txt),
  }
  # Examples after the first keep 3/4 of the ratio: one padded program serves different valid lengths.
  keeps = [args.keep] + [0.75 * args.keep] * (B - 1)
  sparse = _sparse_inputs(cfg, dense, n_target, n_target, args.refs, keeps, rng)
  full = _sparse_inputs(cfg, dense, n_target, n_target, args.refs, [1.0] * B, rng)

  print(f"Small FLUX.2-style model: hidden {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}, "
        f"{cfg.depth_double} double + {cfg.depth_single} single blocks, "
        f"{sum(x.size for x in jax.tree.leaves(state)):,} parameters, float32 on {jax.devices()[0].platform}.")
  print(f"Batch {B}, text {args.txt} tokens, target {g}x{g} tokens, {args.refs} reference(s) of {g}x{g} tokens, "
        f"keep ratio {args.keep}.")
  runs = [("dense", dense), ("padded, keep 1", full), (f"sparse, keep {args.keep:g}", sparse)]
  results = {}
  for name, x in runs:
    results[name] = _time(forward, state, jax.tree.map(jnp.asarray, x), args.repeats)

  ref_out = np.asarray(results["dense"][3])[:, :n_target]
  keep1_err = float(np.max(np.abs(np.asarray(results["padded, keep 1"][3])[:, :n_target] - ref_out)))
  base_s, base_f = results["dense"][1], results["dense"][2]
  print(f"\n{'run':<18} {'image tokens (valid)':>22} {'compile s':>9} {'step ms':>9} {'GFLOP':>9} "
        f"{'speedup':>8} {'ideal':>6}")
  for name, x in runs:
    c, s, f, _ = results[name]
    valid = x.get("img_lengths", [x["img"].shape[1]] * B)
    print(f"{name:<18} {x['img'].shape[1]:>7} ({', '.join(str(int(v)) for v in valid):>12}) {c:>9.2f} "
          f"{1e3 * s:>9.2f} {f / 1e9:>9.3f} {base_s / s:>7.2f}x {base_f / f:>5.2f}x")
  print(f"\nkeep 1 through the padded path vs dense, target outputs: max |diff| = {keep1_err:.2e} "
        f"(max |out| = {np.max(np.abs(ref_out)):.2f})")
  return 0
