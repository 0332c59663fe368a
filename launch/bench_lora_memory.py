"""Benchmark: memory per device of the compiled train step, full fine-tune vs LoRA (XLA's `memory_analysis()`).

For each preset (default klein 4B and klein 9B) the real train step (`plan/train.py` `plan_local`: the train
state as ShapeDtypeStructs in the train shardings, nothing allocated, `train.step.compile_step`) is compiled for
this process's devices, by default --devices 8 fake CPU devices (`--xla_force_host_platform_device_count`), on a
pure FSDP mesh (1, 8, 1), one example per device, at the dense rung (every reference token: the most memory), from
`configs/base.py` (its remat policy and scanned layers unless overridden). Rows:

  full        every weight trained, the config's param dtype (float32 master weights and AdamW moments)
  full-bf16   the same with `model.param_dtype=bfloat16` (weights and moments in bfloat16)
  lora16      LoRA rank 16 (alpha 16, the default targets) over a frozen bfloat16 base, AdamW over the factors
  lora64      LoRA rank 64

It prints a Markdown table (per device: the parameters, LoRA factors, optimizer state and batch, then XLA's
arguments, outputs, temporaries and total (arguments + outputs not aliased to donated arguments + temporaries +
code), the trainable parameters and the total over the `full` row's) and writes the rows as JSON (--json).

  python launch/bench_lora_memory.py                                 # klein 4B and 9B, the four rows
  python launch/bench_lora_memory.py --presets flux2-klein-4b --rows full lora16
  python launch/bench_lora_memory.py --topology v5p:2x2x2 --config.model.attention_impl=auto   # TPU, splash
  python launch/bench_lora_memory.py --config configs/tiny.py --presets flux2-klein-4b --devices 4 --resolution 64 \
      --txt-len 8   # the tiny model (its arch overrides the preset's sizes)

The bytes are the compiled program's for the backend compiled for: on CPU, XLA attention (the only one there)
materialises the score matrices; `--topology` compiles for a TPU slice (libtpu's compile-only devices, no TPU),
where `model.attention_impl=auto` is the splash kernel. Compile
times are for the machine it ran on, only a guide.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GiB = 2**30
ROWS = {
    "full": [],
    "full-bf16": ["model.param_dtype=bfloat16"],
    "lora16": ["lora.rank=16", "lora.alpha=16", "model.param_dtype=bfloat16"],
    "lora64": ["lora.rank=64", "lora.alpha=64", "model.param_dtype=bfloat16"],
}
PRESETS = ("flux2-klein-4b", "flux2-klein-9b")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", nargs="+", default=PRESETS, help="model presets (sparse_context_jax presets)")
  p.add_argument("--rows", nargs="+", default=tuple(ROWS), choices=tuple(ROWS), help="which fine-tunes")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "base.py"), help="FILE.py[:ARG]")
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (one example each, all on fsdp)")
  p.add_argument("--topology", help="compile for this TPU slice's compile-only devices instead (libtpu; e.g. "
                 "v5p:2x2x2, one example per chip)")
  p.add_argument("--resolution", type=int, default=1024, help="square target and reference side, pixels")
  p.add_argument("--refs", type=int, default=2, help="reference slots per example")
  p.add_argument("--txt-len", type=int, default=512, help="text tokens")
  p.add_argument("--json", default="bench_lora_memory.json", help="where to write the rows")
  p.add_argument("--flops", action="store_true", help="also count the step's FLOPs (lowers the unrolled step)")
  from sparse_context_jax.train import config as run_config   # imports jax, whose backend starts later (--devices)
  args, args.extra = run_config.parse_with_overrides(p, argv)
  return args


def row_config(args, preset: str, row: str):
  """The config of one row: the base config at the benchmark's shapes, then the row's overrides."""
  from sparse_context_jax.train import config as run_config
  shapes = [f"model.preset={preset}", f"data.resolution={args.resolution}", f"data.max_refs={args.refs}",
            f"data.txt_len={args.txt_len}", f"train.batch_size={args.devices}", "train.grad_accum=1",
            "mesh=(1, -1, 1)"]
  return run_config.apply_overrides(run_config.load(args.config), shapes + args.extra + ROWS[row])


def measure(config, count_flops: bool = False, topology=None) -> dict:
  """One row: the config's dense rung compiled for this process's devices (`plan_local`) or for `topology`'s, as a
  JSON-able dict."""
  from sparse_context_jax.plan.train import plan_local, plan_rung
  from sparse_context_jax.train import config as run_config
  tic = time.perf_counter()
  if topology is None:
    p = plan_local(config, 1.0, count_flops)
  else:
    run_config.validate(config, topology.chips)
    p = plan_rung(config, topology, topology.devices(), 1.0, count_flops)
  return {"preset": config.model.preset, "lora_rank": int(config.lora.rank), "param_dtype": config.model.param_dtype,
          "dtype": config.model.dtype, "remat": config.model.remat, "scan_layers": bool(config.model.scan_layers),
          "seq": p.seq, "trainable_params": p.trainable_params, "params_bytes": p.params_bytes,
          "lora_bytes": p.lora_bytes, "opt_bytes": p.opt_bytes, "batch_bytes": p.batch_bytes,
          "argument_bytes": p.argument_bytes, "output_bytes": p.output_bytes, "alias_bytes": p.alias_bytes,
          "temp_bytes": p.temp_bytes, "code_bytes": p.code_bytes, "total_bytes": p.total_bytes,
          "flops": p.flops, "compile_seconds": p.compile_seconds, "seconds": time.perf_counter() - tic,
          "error": p.error}


def with_ratios(rows: list[dict]) -> list[dict]:
  """Each row's total over its preset's full fine-tune (the `full` row: the config's param dtype)."""
  full = {r["preset"]: r["total_bytes"] for r in rows if r["row"] == "full"}
  return [{**r, "ratio": r["total_bytes"] / full[r["preset"]] if r["preset"] in full else None} for r in rows]


def table(rows: list[dict]) -> str:
  """Bytes per device in GiB, or MiB when the largest total is under 1 GiB (the tiny model)."""
  unit, scale = ("GiB", GiB) if max(r["total_bytes"] for r in rows) >= GiB else ("MiB", 2**20)
  g = lambda n: f"{n / scale:.2f}"
  out = [f"| model | fine-tune | params | LoRA | opt state | batch | arguments | outputs | temporaries | total "
         f"{unit}/device | trainable params | / full | compile s |", "|" + "---|" * 13]
  for r in rows:
    tune = f"LoRA r{r['lora_rank']}, {r['param_dtype']} base" if r["lora_rank"] else f"full, {r['param_dtype']}"
    ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
    total = g(r["total_bytes"]) + (" (OOM)" if r["error"] else "")
    out.append(f"| {r['preset']} | {tune} | {g(r['params_bytes'])} | {g(r['lora_bytes'])} | {g(r['opt_bytes'])} "
               f"| {g(r['batch_bytes'])} | {g(r['argument_bytes'])} | {g(r['output_bytes'])} "
               f"| {g(r['temp_bytes'])} | {total} | {r['trainable_params']:,} | {ratio} "
               f"| {r['compile_seconds']:.0f} |")
  return "\n".join(out)


def main(argv=None) -> int:
  args = parse_args(argv)
  topology = None
  if args.topology:
    from sparse_context_jax.plan.chips import parse_topology
    topology = parse_topology(args.topology)
    args.devices = topology.chips
  else:   # before jax starts: the fake devices (a real accelerator's devices are used as they are)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  devices = topology.devices() if topology else jax.devices()
  where = f"{topology.name} ({len(devices)} chips)" if topology else f"{len(devices)} {devices[0].platform} devices"
  rows = []
  for preset in args.presets:
    for name in args.rows:
      config = row_config(args, preset, name)
      print(f"compiling {config.model.preset} {name} ({where}, remat={config.model.remat}, scan_layers="
            f"{config.model.scan_layers}) ...", file=sys.stderr, flush=True)
      rows.append({"row": name, **measure(config, args.flops, topology)})
      print(f"  {rows[-1]['total_bytes'] / GiB:.2f} GiB/device, compiled in {rows[-1]['compile_seconds']:.0f} s",
            file=sys.stderr, flush=True)
      rows = with_ratios(rows)
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json, "w") as f:    # after every row: a long run keeps what it measured
        json.dump({"devices": len(devices), "platform": devices[0].platform, "topology": args.topology,
                   "jax": jax.__version__, "resolution": args.resolution, "refs": args.refs,
                   "txt_len": args.txt_len, "batch_per_device": 1, "mesh": [1, len(devices), 1],
                   "attention_impl": config.model.attention_impl, "rows": rows}, f, indent=1)
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
