"""Benchmark: the reference K/V cache, alone and with sparse references, per denoiser step and per image.

For 1, 2 and 4 references it compiles and times (interleaved medians, as bench_sparse) every call of a sampling
loop: the joint step with dense and with sparse references (`--keep`), the KV extract step (dense and sparse) and
the KV cached step (dense and sparse cache), and the physical limit, a step of text and target alone (what a
cached step costs when its reference keys are free). XLA's FLOP counts (unrolled programs) give the ideal. Per
image at S steps: joint S x step, KV extract + (S - 1) x cached. It also prints the cache size and writes a JSON.

  python launch/bench_kv.py                          # medium config on a CPU (hidden 256, 2+6 blocks, 256x256)
  python launch/bench_kv.py --preset flux2-klein-9b-kv --size 1024 --txt 512 --dtype bfloat16 \\
      --param-dtype bfloat16 --flops-only             # the real klein 9B KV shape, abstract weights, FLOPs only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_context_jax.model import MMDiT  # noqa: E402
from sparse_context_jax.model.jitted import flops  # noqa: E402
from sparse_context_jax.model.positions import TOKEN_PIXELS, image_ids  # noqa: E402
from sparse_context_jax.model.reference_kv import cache_bytes  # noqa: E402
from sparse_context_jax.programs import ModuleProgram  # noqa: E402
from sparse_context_jax.sparse import Reference, SparsePacker, SparseRequest, dense_inputs  # noqa: E402
from sparse_context_jax.sparse.compare import interleaved_medians  # noqa: E402
from bench_sparse import build_model, text_inputs  # noqa: E402  (launch/, this script's folder)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="medium", help="'medium' (klein-9B-like, --hidden wide) or a preset name")
  p.add_argument("--hidden", type=int, default=256, help="hidden size of the medium config (heads of 128)")
  p.add_argument("--depth", type=int, nargs=2, default=(2, 6), metavar=("DOUBLE", "SINGLE"))
  p.add_argument("--size", type=int, default=256, help="target and reference side in pixels")
  p.add_argument("--txt", type=int, default=32, help="text tokens")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--refs", type=int, nargs="+", default=(1, 2, 4))
  p.add_argument("--keep", type=float, default=0.25, help="keep ratio of the sparse rows")
  p.add_argument("--strategy", default="random")
  p.add_argument("--steps", type=int, nargs="+", default=(4, 28), help="steps per image of the per-image table")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attention", default=None, choices=(None, "xla", "cudnn"), help="dot_product_attention impl")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--flops-only", action="store_true", help="abstract weights, no timing: XLA's FLOP counts")
  p.add_argument("--out", default="bench_out", help="folder for the JSON")
  return p.parse_args(argv)


class Calls:
  """The model behind compiled programs taking the K/V arguments as static values, and its FLOP counts."""

  def __init__(self, model: MMDiT):
    call = lambda m, x, **static: m(**x, **static)
    self.program = ModuleProgram(model, call, "step")
    unrolled = nnx.merge(self.program.graphdef, self.program.state)
    unrolled.scan_layers = False   # XLA counts a scan's body once: count the unrolled program
    self.unrolled = ModuleProgram(unrolled, call, "step_unrolled")

  def __call__(self, x, **static):
    return self.program(x, **static)

  def shape(self, x, **static):
    return jax.eval_shape(lambda s, x: self.program.programs.fn(s, x, **static), self.program.state, x)

  def flops(self, x, **static) -> float:
    p = self.unrolled
    return flops(p.programs.jit(p.state, x, **static).lower(p.state, x))


def build(args):
  cfg, model = build_model(args, "flux2-klein-9b-kv")
  return cfg, Calls(model)


MODES = ("dense", "sparse", "extract", "cached", "sparse extract", "sparse cached", "limit")


def step_calls(cfg, args, n_refs, target, common, packer):
  """Per mode: (model inputs, static K/V arguments, reference slots held by the cache or None)."""
  size = (args.size, args.size)
  refs = [Reference(target, size) for _ in range(n_refs)]
  img, ids = dense_inputs(cfg, target, size, refs)
  x = packer(target, size, refs, SparseRequest(args.strategy, keep=args.keep))
  n = target.shape[1]
  target_ids = jnp.asarray(image_ids(cfg, args.size // TOKEN_PIXELS, args.size // TOKEN_PIXELS))
  dense = dict(img=img, img_ids=ids, **common)
  sparse = dict(img=x.img, img_ids=x.img_ids, img_lengths=x.img_lengths, **common)
  alone = dict(img=target, img_ids=target_ids, **common)
  return {
      "dense": (dense, {}, None), "sparse": (sparse, {}, None),
      "extract": (dense, dict(kv_cache_mode="extract", num_ref_tokens=img.shape[1] - n), None),
      "cached": (alone, dict(kv_cache_mode="cached"), ("extract", img.shape[1] - n)),
      "sparse extract": (sparse, dict(kv_cache_mode="extract", num_ref_tokens=x.img.shape[1] - n), None),
      "sparse cached": (alone, dict(kv_cache_mode="cached"), ("sparse extract", x.img.shape[1] - n)),
      "limit": (alone, {}, None),
  }, x


def run(args) -> dict:
  cfg, calls = build(args)
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  side, B = args.size // TOKEN_PIXELS, args.batch
  n = side * side
  common = text_inputs(cfg, args, rng, dtype)
  packer = SparsePacker(cfg, max_refs=max(args.refs))
  print(f"{args.preset}: hidden {cfg.hidden_size}, {cfg.depth_double}+{cfg.depth_single} blocks, "
        f"{sum(x.size for x in jax.tree.leaves(calls.program.state)):,} parameters, {args.dtype} compute on "
        f"{jax.devices()[0].device_kind}; batch {B}, {args.txt} text tokens, target and references "
        f"{args.size}x{args.size} ({n} tokens each), sparse keep {args.keep} ({args.strategy}), "
        f"{'FLOPs only' if args.flops_only else f'median of {args.repeats}'}.", flush=True)
  result = {"steps": [], "images": []}
  for n_refs in args.refs:
    target = jnp.asarray(rng.standard_normal((B, n, cfg.in_channels)), dtype)
    modes, packed = step_calls(cfg, args, n_refs, target, common, packer)
    caches, inputs = {}, {}
    for mode, (x, static, source) in modes.items():
      if source is not None:
        x = {**x, "kv_cache": caches[source[0]]}
      inputs[mode] = (x, static)
      if static.get("kv_cache_mode") == "extract":
        caches[mode] = (calls.shape(x, **static) if args.flops_only else calls(x, **static))[1]
    gflop = {mode: calls.flops(x, **static) / 1e9 for mode, (x, static) in inputs.items()}
    seconds = ({m: float("nan") for m in inputs} if args.flops_only else
               interleaved_medians({m: (lambda x=x, s=static: calls(x, **s)) for m, (x, static) in inputs.items()},
                                   args.repeats, warmup=2))
    cache_mib = {m: cache_bytes(cfg, B, modes[m][2][1], dtype) / 2**20 for m in ("cached", "sparse cached")}
    print(f"\n{n_refs} reference(s): dense {n_refs * n} reference tokens, sparse bucket {packed.bucket:g} "
          f"({int(packed.img_lengths.max()) - n} kept of {packed.img.shape[1] - n} slots); cache "
          f"{cache_mib['cached']:.2f} MiB dense, {cache_mib['sparse cached']:.2f} MiB sparse")
    print(STEP_HEADER)
    for mode in MODES:
      x, _ = inputs[mode]
      row = dict(refs=n_refs, mode=mode, queries=x["img"].shape[1] + args.txt, gflop=gflop[mode],
                 ms=1e3 * seconds[mode], speedup=seconds["dense"] / seconds[mode], ideal=gflop["dense"] / gflop[mode])
      result["steps"].append(row)
      print(_fmt_step(row))
    print(IMAGE_HEADER)
    for steps in args.steps:
      per_image = {
          "dense": ("dense", "dense"), "sparse": ("sparse", "sparse"), "KV": ("extract", "cached"),
          "sparse+KV": ("sparse extract", "sparse cached"), "limit": ("limit", "limit")}
      for name, (first, rest) in per_image.items():
        total = lambda d: d[first] + (steps - 1) * d[rest]
        dense = lambda d: steps * d["dense"]
        row = dict(refs=n_refs, steps=steps, mode=name, ms=1e3 * total(seconds), gflop=total(gflop),
                   speedup=dense(seconds) / total(seconds), ideal=dense(gflop) / total(gflop),
                   cache_mib=cache_mib.get({"KV": "cached", "sparse+KV": "sparse cached"}.get(name), 0.0))
        result["images"].append(row)
        print(_fmt_image(row))
  return result


STEP_HEADER = (f"{'step':<15} {'queries':>7} {'GFLOP':>9} {'ms':>9} {'speedup':>8} {'ideal':>7} "
               f"{'ach/ideal':>9}")
IMAGE_HEADER = (f"{'image':<10} {'steps':>5} {'GFLOP':>10} {'ms':>10} {'speedup':>8} {'ideal':>7} "
                f"{'ach/ideal':>9} {'cache MiB':>9}")


def _fmt_step(r: dict) -> str:
  return (f"{r['mode']:<15} {r['queries']:>7} {r['gflop']:>9.2f} {r['ms']:>9.2f} {r['speedup']:>7.2f}x "
          f"{r['ideal']:>6.2f}x {r['speedup'] / r['ideal']:>9.2f}")


def _fmt_image(r: dict) -> str:
  return (f"{r['mode']:<10} {r['steps']:>5} {r['gflop']:>10.1f} {r['ms']:>10.1f} {r['speedup']:>7.2f}x "
          f"{r['ideal']:>6.2f}x {r['speedup'] / r['ideal']:>9.2f} {r['cache_mib']:>9.2f}")


def main(argv=None) -> int:
  args = parse_args(argv)
  result = run(args)
  os.makedirs(args.out, exist_ok=True)
  tag = f"{args.preset}_{args.size}_{args.dtype}_{'flops' if args.flops_only else jax.devices()[0].platform}"
  with open(os.path.join(args.out, f"bench_kv_{tag}.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {args.out}/bench_kv_{tag}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
