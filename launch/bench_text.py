"""Benchmark: text-encoder throughput on this machine and XLA's FLOPs per prompt of the released encoders.

Throughput: prompts/s of each encoder (Qwen3-like decoder, T5 encoder, CLIP text) at a tiny and a medium shape,
random weights, one compiled call per batch (median of --repeats after a warm-up).

FLOPs: per 512-token prompt (CLIP: 77) of Qwen3-8B / Qwen3-4B (FLUX.2 klein), the T5-XXL encoder (FLUX.1) and the
text model of Mistral-Small-3.1 24B (FLUX.2 dev), with and without the layer cut the pipeline allows (klein reads
hidden state 27 of 36, dev 30 of 40), from abstract weights (`nnx.eval_shape`, nothing allocated) and
`jax.jit(...).lower(...).compile().cost_analysis()`. XLA counts a `lax.scan` body once, so the counts come from
unrolled programs of 1, 2 and 3 layers: the 3-layer count checks that the layers add linearly, and the full depth is
extrapolated from them (compiling 40 unrolled 24B layers on a CPU takes minutes and gives the same number). An
analytic count (2 x multiply-adds of the matmuls, attention over all S x S pairs) is printed beside it.

  python launch/bench_text.py                 # both tables (a few minutes on 2 CPU cores)
  python launch/bench_text.py --flops-only    # only the FLOP table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_context_jax.text import (CLIPTextConfig, CLIPTextEncoder, DecoderConfig, DecoderEncoder,  # noqa: E402
                                     T5Encoder, T5EncoderConfig)


def _decoder(arch, D, L, H, K, Dh, inter, vocab, theta=1e6, qk_norm=True, **kw) -> DecoderConfig:
  return DecoderConfig(architecture=arch, vocab_size=vocab, hidden_size=D, intermediate_size=inter,
                       num_hidden_layers=L, num_heads=H, num_kv_heads=K, head_dim=Dh, rope_theta=theta,
                       rms_norm_eps=1e-6, qk_norm=qk_norm, **kw)


# name -> (config, tokens per prompt, layers the pipeline needs or None).
RELEASED = {
    "Qwen3-8B (klein 9B)": (_decoder("Qwen3ForCausalLM", 4096, 36, 32, 8, 128, 12288, 151936), 512, 27),
    "Qwen3-4B (klein 4B)": (_decoder("Qwen3ForCausalLM", 2560, 36, 32, 8, 128, 9728, 151936), 512, 27),
    "T5-XXL encoder (FLUX.1)": (T5EncoderConfig(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64,
                                                num_layers=24), 512, None),
    "Mistral-Small-3.1 24B text (dev)": (_decoder("Mistral3ForConditionalGeneration", 5120, 40, 32, 8, 128, 32768,
                                                  131072, theta=1e9, qk_norm=False), 512, 30),
    "CLIP ViT-L/14 text (FLUX.1)": (CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                   num_heads=12, num_layers=12, max_position_embeddings=77), 77, None),
}

# name -> (config, tokens, batch) for the throughput table.
THROUGHPUT = {
    "decoder tiny": (_decoder("Qwen3ForCausalLM", 64, 2, 4, 2, 16, 128, 1000), 64, 8),
    "decoder medium": (_decoder("Qwen3ForCausalLM", 512, 6, 8, 4, 64, 1536, 32000), 512, 2),
    "t5 tiny": (T5EncoderConfig(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2), 64, 8),
    "t5 medium": (T5EncoderConfig(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=8, num_layers=6),
                  512, 2),
    "clip tiny": (CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_heads=4, num_layers=2,
                                 max_position_embeddings=77), 77, 8),
    "clip medium": (CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_heads=12,
                                   num_layers=12, max_position_embeddings=77), 77, 4),
}


def _module(cfg):
  return {DecoderConfig: DecoderEncoder, T5EncoderConfig: T5Encoder, CLIPTextConfig: CLIPTextEncoder}[type(cfg)]


def _layers(cfg) -> int:
  return cfg.num_layers


def _with_layers(cfg, n: int):
  if isinstance(cfg, DecoderConfig):
    return cfg.replace(num_hidden_layers=n, num_layers=n)
  return cfg.replace(num_layers=n)


def _program(model: nnx.Module):
  graphdef, state = nnx.split(model)
  if isinstance(model, DecoderEncoder):
    n = model.config.num_layers
    call = lambda m, ids, mask: m(ids, mask, hidden_states=(n,))
  else:
    call = lambda m, ids, mask: m(ids, mask)
  return jax.jit(lambda s, ids, mask: call(nnx.merge(graphdef, s), ids, mask)), state


def xla_flops(cfg, tokens: int, dtype=jnp.bfloat16) -> float:
  """XLA's FLOPs of one prompt through `cfg`'s encoder, unrolled, abstract weights."""
  model = nnx.eval_shape(lambda: _module(cfg)(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                              scan_layers=False))
  fn, state = _program(model)
  ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
  cost = fn.lower(state, ids, ids).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def extrapolated_flops(cfg, tokens: int, layers: int) -> float:
  f1, f2, f3 = (xla_flops(_with_layers(cfg, n), tokens) for n in (1, 2, 3))
  per_layer = f2 - f1
  if abs(f3 - (f1 + 2 * per_layer)) > 1e-3 * f3:
    raise RuntimeError(f"XLA's counts are not linear in the layers: {f1:.4g}, {f2:.4g}, {f3:.4g}")
  return f1 + (layers - 1) * per_layer


def analytic_flops(cfg, S: int, layers: int) -> float:
  """2 x multiply-adds of every matmul, attention over all S^2 pairs (no causal saving)."""
  if isinstance(cfg, DecoderConfig):
    D, q, kv, I = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_token = D * (2 * q + 2 * kv) + 3 * D * I
  elif isinstance(cfg, T5EncoderConfig):
    D, q = cfg.d_model, cfg.num_heads * cfg.d_kv
    per_token = 4 * D * q + (3 if cfg.is_gated_act else 2) * D * cfg.d_ff
  else:
    D, q = cfg.hidden_size, cfg.hidden_size
    per_token = 4 * D * q + 2 * D * cfg.intermediate_size
  return layers * (2 * S * per_token + 4 * S * S * q)


def flops_table() -> list[dict]:
  rows = []
  for name, (cfg, tokens, cut) in RELEASED.items():
    depth = _layers(cfg)
    for layers in ([depth] if cut is None else [depth, cut]):
      t0 = time.perf_counter()
      flops = extrapolated_flops(cfg, tokens, layers)
      rows.append(dict(encoder=name, tokens=tokens, layers=f"{layers}/{depth}", tflops=flops / 1e12,
                       analytic_tflops=analytic_flops(cfg, tokens, layers) / 1e12,
                       saving=None if layers == depth else 1 - layers / depth, seconds=time.perf_counter() - t0))
      print(f"  {name:34s} {layers:2d}/{depth:2d} layers  {flops / 1e12:7.3f} TFLOP  "
            f"(analytic {rows[-1]['analytic_tflops']:7.3f})", flush=True)
  return rows


def throughput_table(repeats: int) -> list[dict]:
  rows = []
  for name, (cfg, tokens, batch) in THROUGHPUT.items():
    model = _module(cfg)(cfg, rngs=nnx.Rngs(0))
    fn, state = _program(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, tokens)), jnp.int32)
    mask = jnp.asarray(np.arange(tokens)[None, :] < rng.integers(tokens // 2, tokens + 1, (batch, 1)), jnp.int32)
    jax.block_until_ready(fn(state, ids, mask))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, ids, mask))
      times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    params = sum(x.size for x in jax.tree.leaves(state))
    rows.append(dict(encoder=name, params_m=params / 1e6, tokens=tokens, batch=batch, ms_per_batch=sec * 1e3,
                     prompts_per_s=batch / sec))
    print(f"  {name:16s} {params / 1e6:7.2f} M params  {tokens:4d} tokens x {batch}  {sec * 1e3:9.2f} ms/batch  "
          f"{batch / sec:9.2f} prompts/s", flush=True)
  return rows


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=120)
  labels = [f"{r['encoder']}\n{r['layers']} layers" for r in rows]
  ax.barh(range(len(rows)), [r["tflops"] for r in rows], color=["C1" if r["saving"] else "C0" for r in rows])
  ax.set_yticks(range(len(rows)), labels=labels, fontsize=6)
  ax.invert_yaxis()
  ax.set_xlabel("XLA TFLOP per prompt")
  ax.set_title("text encoders: FLOPs per prompt, full depth (blue) and cut at the last layer read (orange)",
               fontsize=8)
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--flops-only", action="store_true")
  p.add_argument("--out", default="bench_out")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  result = {"backend": jax.default_backend(), "devices": str(jax.devices())}
  if not args.flops_only:
    print(f"throughput ({jax.default_backend()}, float32, random weights, right-padded batches):")
    result["throughput"] = throughput_table(args.repeats)
  print("XLA FLOPs per prompt (abstract bfloat16 weights):")
  result["flops"] = flops_table()
  with open(os.path.join(args.out, "bench_text.json"), "w") as f:
    json.dump(result, f, indent=1)
  _plot(result["flops"], os.path.join(args.out, "bench_text_flops.png"))
  print(f"wrote {args.out}/bench_text.json and bench_text_flops.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
