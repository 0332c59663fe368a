"""Benchmark: denoiser step latency with dense vs sparse references, against XLA's own FLOP count.

For 1, 2 and 4 references and keep ratios 1, 0.5, 0.25, 0.1 it times one compiled denoiser call (median of
--repeats after a warm-up), reads the FLOPs of each compiled program (`compiled.cost_analysis()`), and prints
achieved speedup, ideal (FLOP) speedup, achieved / ideal and the bucket padding waste; it writes a PNG plot of
speedup vs keep ratio and a JSON of the rows. `--strategy attention` also times its scoring pass (the dense forward
of the first double blocks, `model/attention_mass.py`) in the same interleaved rounds: the "score" row, whose
"speedup" is the dense step's time over the pass's (its GFLOP are not counted: XLA counts a scan's body once).

  python launch/bench_sparse.py                       # medium config for a CPU (~hidden 256, 16x16-token images)
  python launch/bench_sparse.py --preset flux2-klein-9b --size 1024 --txt 512 --dtype bfloat16 \\
      --param-dtype bfloat16 --attention cudnn          # the real klein 9B shape, random weights (accelerator)

The medium default keeps the real model's balance of attention to linear-layer FLOPs (flux2-klein-9b at 1024x1024
with 4 references: attention is about 44%; hidden 256 with 16x16-token images and 32 text tokens: the same).
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

from sparse_context_jax import compile_cache  # noqa: E402
from sparse_context_jax.model import MMDiT, preset  # noqa: E402
from sparse_context_jax.model.attention_mass import attention_mass, resolve_blocks  # noqa: E402
from sparse_context_jax.model.jitted import JittedMMDiT  # noqa: E402
from sparse_context_jax.model.positions import TOKEN_PIXELS, text_ids  # noqa: E402
from sparse_context_jax.programs import ModuleProgram  # noqa: E402
from sparse_context_jax.sparse import STRATEGIES, Reference, SparsePacker, SparseRequest, dense_inputs  # noqa: E402
from sparse_context_jax.sparse.compare import interleaved_medians  # noqa: E402
from plots import speedup_plot  # noqa: E402  (launch/, this script's folder)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="medium", help="'medium' (klein-9B-like, --hidden wide) or a preset name")
  p.add_argument("--hidden", type=int, default=256, help="hidden size of the medium config (heads of 128)")
  p.add_argument("--depth", type=int, nargs=2, default=(2, 6), metavar=("DOUBLE", "SINGLE"),
                 help="blocks of the medium config (klein 9B has 8 and 24: the same 1:3 ratio)")
  p.add_argument("--size", type=int, default=256, help="target and reference side in pixels")
  p.add_argument("--txt", type=int, default=32, help="text tokens")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--refs", type=int, nargs="+", default=(1, 2, 4))
  p.add_argument("--keeps", type=float, nargs="+", default=(1.0, 0.5, 0.25, 0.1))
  p.add_argument("--strategy", default="random", choices=STRATEGIES)
  p.add_argument("--attention-blocks", type=int, nargs="+", metavar="I",
                 help="--strategy attention: the double blocks it averages (default: three evenly spaced)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attention", default=None, choices=(None, "xla", "cudnn", "splash", "auto"),
                 help="attention implementation (model.blocks.attention)")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--flops-only", action="store_true", help="abstract weights, no timing: XLA's FLOP counts (the "
                 "ideal speedups) of any shape on any machine, e.g. the real klein 9B at 1024x1024 on a CPU")
  p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts (on backends that count only "
                 "compiled programs they cost one unrolled compile per shape)")
  p.add_argument("--out", default="bench_out", help="folder for the plot and the JSON")
  return p.parse_args(argv)


def build_model(args, base: str = "flux2-klein-9b"):
  """(config, model) of --preset: "medium" is `base` at --hidden and --depth; abstract with --flops-only."""
  if args.preset == "medium":
    cfg = preset(base).replace(num_heads=args.hidden // 128, depth_double=args.depth[0],
                               depth_single=args.depth[1], context_dim=3 * args.hidden)
  else:
    cfg = preset(args.preset)
  make = lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype),
                       attention_impl=args.attention)
  return cfg, nnx.eval_shape(make) if args.flops_only else make()


def text_inputs(cfg, args, rng, dtype) -> dict:
  """The text, timestep and text-id inputs every benchmarked call shares (batch --batch, --txt tokens)."""
  B = args.batch
  return dict(txt=jnp.asarray(rng.standard_normal((B, args.txt, cfg.context_dim)), dtype),
              timesteps=jnp.full((B,), 0.6, jnp.float32), txt_ids=jnp.asarray(text_ids(cfg, args.txt)))


def build(args):
  cfg, model = build_model(args)
  return cfg, JittedMMDiT(model)


def attention_scorer(model: JittedMMDiT):
  """The `attention` strategy's scoring pass over the benchmarked model's weights: `scorer(dense kw, n_target=N,
  blocks=...)` -> (B, L) mass of every image key."""
  return ModuleProgram(nnx.merge(model.graphdef, model.state),
                       lambda m, kw, **static: attention_mass(m, **kw, **static), "attention")


def with_attention(refs, mass, n: int):
  """The references with their slices of the (B, L) mass (target first)."""
  ends = np.cumsum([n] + [r.tokens for r in refs])
  return [Reference(r.latents, r.size, attention=mass[:, a:b]) for r, a, b in zip(refs, ends[:-1], ends[1:])]


def run(args) -> list[dict]:
  cfg, model = build(args)
  scorer = attention_scorer(model) if args.strategy == "attention" and not args.flops_only else None
  blocks = resolve_blocks(cfg, args.attention_blocks) if args.strategy == "attention" else None
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  side, B = args.size // TOKEN_PIXELS, args.batch
  n = side * side
  latents = lambda m: jnp.asarray(rng.standard_normal((B, m, cfg.in_channels)), dtype)
  common = text_inputs(cfg, args, rng, dtype)
  packer = SparsePacker(cfg, max_refs=max(args.refs))
  print(f"{args.preset}: hidden {cfg.hidden_size}, {cfg.depth_double}+{cfg.depth_single} blocks, "
        f"{sum(x.size for x in jax.tree.leaves(model.state)):,} parameters, {args.dtype} compute on "
        f"{jax.devices()[0].device_kind}; batch {B}, {args.txt} text tokens, target and references "
        f"{args.size}x{args.size} ({n} tokens each), strategy {args.strategy}, median of {args.repeats}.",
        flush=True)
  print(HEADER)
  rows = []
  for n_refs in args.refs:
    target = latents(n)
    refs = [Reference(latents(n), (args.size, args.size)) for _ in range(n_refs)]
    img, ids = dense_inputs(cfg, target, (args.size, args.size), refs)
    runs = {"dense": (None, dict(img=img, img_ids=ids, **common))}
    timed = {}
    if args.strategy == "attention":
      score = dict(img=img, img_ids=ids, **common)
      if scorer is None:   # --flops-only: abstract weights; the selection does not change any shape
        mass = jnp.ones(img.shape[:2], jnp.float32)
      else:
        mass = scorer(score, n_target=n, blocks=blocks)
        timed["score"] = lambda score=score: scorer(score, n_target=n, blocks=blocks)
      refs = with_attention(refs, mass, n)
    for keep in args.keeps:
      x = packer(target, (args.size, args.size), refs, SparseRequest(args.strategy, keep=keep))
      runs[keep] = (x, dict(img=x.img, img_ids=x.img_ids, img_lengths=x.img_lengths, **common))
    info = {}
    for name, (x, kw) in runs.items():
      before = model.programs.count
      compile_s = model.compile_seconds(**kw)
      # a program of this sequence length may exist already (another reference count at another keep ratio)
      info[name] = (compile_s, model.programs.count == before and name != "dense",
                    float("nan") if args.no_flops else model.flops(**kw))
    seconds = ({name: float("nan") for name in runs} if args.flops_only else
               interleaved_medians({**{name: (lambda kw=kw: model(**kw)) for name, (_, kw) in runs.items()},
                                    **timed}, args.repeats, warmup=2))
    dense_s, dense_flops = seconds["dense"], info["dense"][2]
    for name, (x, kw) in runs.items():
      compile_s, shared, f = info[name]
      rows.append(dict(refs=n_refs, keep=name, bucket=None if x is None else x.bucket, seq=kw["img"].shape[1],
                       valid=int(np.max(np.asarray(kw.get("img_lengths", [kw["img"].shape[1]])))),
                       waste=0.0 if x is None else x.padding_waste, ms=1e3 * seconds[name], gflop=f / 1e9,
                       speedup=dense_s / seconds[name], ideal=dense_flops / f, compile_s=compile_s, shared=shared))
      print(_fmt(rows[-1]), flush=True)
    if "score" in seconds:
      rows.append(dict(refs=n_refs, keep="score", bucket=None, seq=img.shape[1], valid=img.shape[1], waste=0.0,
                       ms=1e3 * seconds["score"], gflop=float("nan"), speedup=dense_s / seconds["score"],
                       ideal=float("nan"), compile_s=scorer.seconds_to_compile(score, n_target=n, blocks=blocks),
                       shared=False, blocks=list(blocks)))
      print(_fmt(rows[-1]), flush=True)
  return rows


HEADER = (f"{'refs':>4} {'keep':>6} {'bucket':>6} {'seq':>6} {'valid':>6} {'waste':>6} {'step ms':>9} "
          f"{'GFLOP':>9} {'speedup':>8} {'ideal':>6} {'ach/ideal':>9} {'compile s':>9}")


def _fmt(r: dict) -> str:
  keep = r["keep"] if isinstance(r["keep"], str) else f"{r['keep']:g}"
  bucket = "-" if r["bucket"] is None else f"{r['bucket']:.3g}"
  return (f"{r['refs']:>4} {keep:>6} {bucket:>6} {r['seq'] + 0:>6} {r['valid']:>6} {100 * r['waste']:>5.1f}% "
          f"{r['ms']:>9.2f} {r['gflop']:>9.2f} {r['speedup']:>7.2f}x {r['ideal']:>5.2f}x "
          f"{r['speedup'] / r['ideal']:>9.2f} {r['compile_s']:>9.2f}{' (shared)' if r.get('shared') else ''}")


def plot(rows: list[dict], path: str, title: str) -> None:
  series = {}
  for r in rows:
    if not isinstance(r["keep"], str):
      series.setdefault(f"{r['refs']} ref{'s' if r['refs'] > 1 else ''}", []).append(
          (r["keep"], r["speedup"], r["ideal"]))
  speedup_plot(dict(sorted(series.items())), path, title, "denoiser step speedup vs dense")


def main(argv=None) -> int:
  compile_cache.enable()   # a rerun reads its programs back ($SCJ_COMPILE_CACHE=off: compile again)
  args = parse_args(argv)
  rows = run(args)
  if args.flops_only:
    return 0
  os.makedirs(args.out, exist_ok=True)
  tag = f"{args.preset}_{args.size}_{args.dtype}_{jax.devices()[0].platform}"
  with open(os.path.join(args.out, f"bench_sparse_{tag}.json"), "w") as f:
    json.dump(rows, f, indent=1)
  plot(rows, os.path.join(args.out, f"bench_sparse_{tag}.png"),
       f"{args.preset} {args.size}px, {args.dtype}, {jax.devices()[0].device_kind}")
  sparse = [r for r in rows if not isinstance(r["keep"], str) and r["keep"] <= 0.5]
  print(f"\nachieved / ideal at keep <= 0.5: min {min(r['speedup'] / r['ideal'] for r in sparse):.2f}; "
        f"wrote {args.out}/bench_sparse_{tag}.png and .json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
