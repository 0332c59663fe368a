"""Benchmark: images per second of batch generation (`Generator`), dense vs sparse references.

For 1 and 4 references and keep ratios 1 (dense) and 0.25, it generates --images images per point in batches
(the whole denoising loop and the VAE decode, compiled once per point and excluded from the timing by a warm-up
batch; the timing covers reference encoding and packing, sampling and decoding) and prints images/s and the
speedup. Random weights; a small FLUX.2-style model and VAE by default.

  bash launch/python.sh launch/bench_generate.py
  python launch/bench_generate.py --preset flux2-klein-9b --vae flux2 --size 1024 --txt 512 --steps 28 \
      --batch 1 --images 2 --dtype bfloat16 --attention cudnn --keeps 1 0.25 0.1   # the real shapes (accelerator)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax.sharding import Mesh  # noqa: E402

from sparse_context_jax import compile_cache  # noqa: E402
from sparse_context_jax.encoders.vae import VAEImageEncoder  # noqa: E402
from sparse_context_jax.generate import Generator, Pipeline, make_job  # noqa: E402
from sparse_context_jax.model import MMDiT, preset  # noqa: E402
from sparse_context_jax.model.vae import VAE_PRESETS, VAEConfig, AutoencoderKL  # noqa: E402
from sparse_context_jax.sparse import SparseRequest  # noqa: E402


def main(argv=None) -> int:
  compile_cache.enable()   # a rerun reads its programs back ($SCJ_COMPILE_CACHE=off: compile again)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="medium", help="'medium' (klein-9B-like, --hidden wide) or a FLUX.2 preset")
  p.add_argument("--vae", default="small", choices=("small", "flux2"), help="a small random VAE or the real one")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and weights")
  p.add_argument("--attention", default=None, choices=(None, "xla", "cudnn", "splash", "auto"))
  p.add_argument("--txt", type=int, default=32, help="text tokens")
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--depth", type=int, nargs=2, default=(2, 6))
  p.add_argument("--size", type=int, default=256, help="target and reference side in pixels")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--images", type=int, default=4, help="timed images per point")
  p.add_argument("--refs", type=int, nargs="+", default=(1, 4))
  p.add_argument("--keeps", type=float, nargs="+", default=(1.0, 0.25))
  args = p.parse_args(argv)

  if args.preset == "medium":
    cfg = preset("flux2-klein-9b").replace(num_heads=args.hidden // 128, depth_double=args.depth[0],
                                           depth_single=args.depth[1], context_dim=3 * args.hidden)
  else:
    cfg = preset(args.preset)
  vae_cfg = VAE_PRESETS["flux2"] if args.vae == "flux2" else VAEConfig(
      family="flux2", block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32, norm_num_groups=8,
      use_quant_conv=True, use_post_quant_conv=True, scaling_factor=1.0, shift_factor=0.0)
  dtype = jnp.dtype(args.dtype)
  model = MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, attention_impl=args.attention)
  vae = AutoencoderKL(vae_cfg, rngs=nnx.Rngs(1), dtype=dtype, param_dtype=dtype)
  pipeline = Pipeline(model, VAEImageEncoder(vae), mesh=Mesh(np.array(jax.devices()), ("data",)))
  gen = Generator(pipeline, batch_size=args.batch)
  rng = np.random.default_rng(0)
  print(f"model {args.preset}: hidden {cfg.hidden_size}, {cfg.depth_double}+{cfg.depth_single} blocks; "
        f"{'the FLUX.2' if args.vae == 'flux2' else 'a small'} VAE; {args.size}x{args.size}, {args.steps} steps, "
        f"batch {args.batch}, {args.txt} text tokens, {args.dtype} on "
        f"{jax.devices()[0].device_kind}, {pipeline.devices} device(s)")
  print(f"{'refs':>4} {'keep':>5} {'seq':>5} {'images/s':>9} {'s/image':>8} {'speedup':>8}")
  base = {}
  for n_refs in args.refs:
    for keep in args.keeps:
      def job(i):
        embeddings = {"txt": rng.standard_normal((args.txt, cfg.context_dim)).astype(np.float32)}
        references = [rng.uniform(-1, 1, (args.size, args.size, 3)).astype(np.float32) for _ in range(n_refs)]
        return make_job(cfg, line=i, output=None, embeddings=embeddings, references=references,
                        masks=[None] * n_refs, request=SparseRequest("grid", keep=keep),
                        size=(args.size, args.size), steps=args.steps, seed=i)
      jobs = [job(i) for i in range(args.batch + args.images)]
      gen.run_batch([gen.prepare(j) for j in jobs[:args.batch]])     # compile and warm up
      t0 = time.perf_counter()   # timed: reference encoding and packing, sampling, decoding
      for i in range(args.batch, len(jobs), args.batch):
        gen.run_batch([gen.prepare(j) for j in jobs[i:i + args.batch]])
      per_image = (time.perf_counter() - t0) / args.images
      seq = gen.prepare(jobs[0]).sequence
      base.setdefault(n_refs, per_image)
      print(f"{n_refs:>4} {keep:>5g} {seq:>5} {1 / per_image:>9.3f} {per_image:>8.3f} "
            f"{base[n_refs] / per_image:>7.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
