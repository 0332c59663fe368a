"""Compile the train step of a config for a TPU topology from this machine and print its memory per chip, FLOPs,
a roofline step time and MFU, for every rung of its bucket ladder: `plan --config configs/FILE.py[:ARG]
--topology v5p-128 [--config.KEY=VALUE ...]`. Needs the TPU runtime (libtpu), not a TPU.

`plan --search ...`: mesh shapes, remat policies and scan / unrolled layers ranked by estimated step time, the
fastest compiled until one fits; a table, a plot (--plot) and the chosen line as `--config.` overrides.

`plan --generate --preset flux2-klein-9b --topology v5e-16 --resolution 1024 --refs 4`: the generator's sampler
instead, batch per chip doubled from 1 to the largest that fits.

Exit status: 0 when every rung (the batch of --batch, or one example per chip) fits in the chip's HBM, 3 when one
does not, 2 on a user error.
"""

from __future__ import annotations

import sys

from sparse_context_jax.cli import UserError

EXTRA_PREFIX = "--config."
EXIT_DOES_NOT_FIT = 3


def add_arguments(parser) -> None:
  parser.add_argument("--config", metavar="FILE.py[:ARG]", help="a get_config(arg) file (train plans)")
  parser.add_argument("--topology", required=True, metavar="NAME",
                      help="a TPU slice: CHIP:AxB[xC] (v5e:2x2, v5p:2x2x2) or CHIP-N (v5e-16, v5p-128); "
                           "chips v4, v5e, v5p, v6e")
  parser.add_argument("--rung", type=float, action="append", metavar="KEEP",
                      help="plan only this keep ratio of the ladder (repeatable; default every rung the config "
                           "can draw)")
  parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
  search = parser.add_argument_group("search (--search)")
  search.add_argument("--search", action="store_true",
                      help="rank meshes x remat policies x scan/unrolled by estimated step time")
  search.add_argument("--plot", metavar="PNG", default="plan_search.png", help="the search's plot")
  search.add_argument("--fits", type=int, default=1, help="compile candidates until this many fit")
  search.add_argument("--max-compiles", type=int, default=6, help="compile at most this many candidates")
  gen = parser.add_argument_group("generation plans (--generate)")
  gen.add_argument("--generate", action="store_true", help="plan the generator's sampler, not the train step")
  gen.add_argument("--preset", default="flux2-klein-9b", help="model preset (sparse_context_jax presets)")
  gen.add_argument("--resolution", type=int, default=1024, help="square target and reference side, pixels")
  gen.add_argument("--refs", type=int, default=1, help="reference images per example")
  gen.add_argument("--keep", type=float, default=1.0, help="keep ratio of the reference tokens (a ladder rung)")
  gen.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weights and compute")
  gen.add_argument("--txt-len", type=int, default=512, help="prompt tokens")
  gen.add_argument("--batch", type=int, default=None, help="only this batch per chip (default: the largest)")
  gen.add_argument("--attention", default="auto", choices=("auto", "xla", "splash"))
  parser.epilog = "Override any config key with --config.KEY=VALUE (e.g. --config.mesh='(1, -1, 4)')."


def gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def table(plans, topology) -> str:
  """One row per rung; bytes in GiB, or MiB when the largest total is under 1 GiB."""
  hbm = topology.chip.usable_bytes
  unit, scale = ("GiB", 2**30) if max(p.total_bytes for p in plans) >= 2**30 else ("MiB", 2**20)
  b = lambda n: f"{n / scale:.2f}"
  head = (f"{'keep':>6} {'seq':>6} {'params':>7} {'opt':>7} {'batch':>6} {'args':>7} {'out':>7} {'temp':>7} "
          f"{'total':>7} {'of HBM':>6} {'TFLOP/step':>10} {'step s':>8} {'MFU':>5} {'compile s':>9}  fits")
  rows = [f"per chip, {unit} (HBM {gib(topology.chip.hbm_bytes)} GiB per {topology.chip.name} chip, {gib(hbm)} "
          "usable); FLOPs of the whole step on all chips; step time and MFU: roofline estimates", head,
          "-" * len(head)]
  for p in plans:
    e = p.estimate
    rows.append(f"{p.ratio:>6.4g} {p.seq:>6} {b(p.params_bytes):>7} {b(p.opt_bytes):>7} {b(p.batch_bytes):>6} "
                f"{b(p.argument_bytes):>7} {b(p.output_bytes):>7} {b(p.temp_bytes):>7} {b(p.total_bytes):>7} "
                f"{p.total_bytes / hbm:>6.0%} {p.flops / 1e12:>10.1f} "
                f"{(f'{e.step_seconds:.4g}' if e else '-'):>8} {(f'{e.mfu:.0%}' if e else '-'):>5} "
                f"{p.compile_seconds:>9.1f}  {'yes' if fits(p, topology) else 'NO'}")
  return "\n".join(rows)


def fits(plan, topology) -> bool:
  """Within the HBM the compiler lets a program use (a little under the published size)."""
  return not plan.error and plan.total_bytes <= topology.chip.usable_bytes


def write_json(path: str, plans, topology, config) -> None:
  import dataclasses
  import json

  from sparse_context_jax.parallel.mesh import mesh_shape
  rows = [{**{k: v for k, v in dataclasses.asdict(p).items() if k != "param_specs"}, "total_bytes": p.total_bytes,
           "fits": fits(p, topology)} for p in plans]
  with open(path, "w") as f:
    json.dump({"topology": topology.name, "accelerator_type": topology.accelerator_type, "chips": topology.chips,
               "hbm_bytes": topology.chip.hbm_bytes, "usable_bytes": topology.chip.usable_bytes,
               "mesh": list(mesh_shape(config.mesh, topology.chips)), "preset": config.model.preset,
               "batch_size": config.train.batch_size, "resolution": config.data.resolution,
               "max_refs": config.data.max_refs, "txt_len": config.data.txt_len,
               "attention_impl": config.model.attention_impl, "remat": config.model.remat,
               "lora_rank": config.lora.rank, "rungs": rows}, f, indent=1)


def run(args) -> int:
  from sparse_context_jax.plan.chips import parse_topology
  from sparse_context_jax.train.config import ConfigError, apply_overrides, load, model_config, validate
  try:
    topology = parse_topology(args.topology)
  except ValueError as e:
    raise UserError(str(e)) from None
  if args.generate:
    return run_generate(args, topology)
  if not args.config:
    raise UserError("plan: --config FILE.py is required (or --generate for a generation plan)")
  try:
    config = apply_overrides(load(args.config), args.extra)
    validate(config, topology.chips)
    model_config(config)
  except ConfigError as e:
    raise UserError(str(e)) from None
  if args.search:
    return run_search(args, config, topology)
  from sparse_context_jax.plan.train import drawable_rungs, plan_train
  ratios = drawable_rungs(config.objective)
  if args.rung:
    bad = [r for r in args.rung if r not in ratios]
    if bad:
      drawn = ", ".join(f"{r:g}" for r in ratios)
      raise UserError(f"--rung {bad[0]:g}: not a rung this config draws (it draws {drawn})")
    ratios = tuple(sorted(set(args.rung)))
  try:
    topology.devices()
  except Exception as e:   # noqa: BLE001 - libtpu's error for a slice it does not know
    raise UserError(f"topology {args.topology!r}: libtpu refused it: {' '.join(str(e).split())[:200]}") from None
  print(f"{args.config} on {topology.name} ({topology.accelerator_type}, {topology.chips} chips), mesh "
        f"(data, fsdp, tensor) = {tuple(config.mesh)}, batch {config.train.batch_size}, rungs "
        f"{', '.join(f'{r:g}' for r in ratios)}", flush=True)
  plans = plan_train(config, topology, ratios, on_rung=lambda p: print(
      f"  compiled keep {p.ratio:g} in {p.compile_seconds:.0f} s" + (" (out of memory)" if p.error else ""),
      file=sys.stderr, flush=True))
  print(table(plans, topology))
  if args.json:
    write_json(args.json, plans, topology, config)
  worst = max(plans, key=lambda p: p.total_bytes)
  for p in plans:
    if p.error:
      print(f"keep {p.ratio:g}: the compiler ran out of memory: {p.error}")
  verdict = "fits" if fits(worst, topology) else "does NOT fit"
  print(f"worst rung: keep {worst.ratio:g}, {gib(worst.total_bytes)} GiB of {gib(topology.chip.usable_bytes)} GiB per "
        f"chip: {verdict}")
  return 0 if all(fits(p, topology) for p in plans) else EXIT_DOES_NOT_FIT


def run_generate(args, topology) -> int:
  from sparse_context_jax.model import preset
  from sparse_context_jax.plan.generate import largest_batch
  from sparse_context_jax.sparse import BucketLadder
  from sparse_context_jax.train.state import DTYPES
  try:
    cfg = preset(args.preset)
  except ValueError as e:
    raise UserError(str(e)) from None
  if args.resolution <= 0 or args.resolution % 16:
    raise UserError(f"--resolution {args.resolution} (expected a positive multiple of 16)")
  if args.refs < 0 or args.txt_len <= 0 or (args.batch is not None and args.batch <= 0):
    raise UserError("--refs must be >= 0, --txt-len and --batch > 0")
  if args.keep not in BucketLadder().ratios:
    rungs = ", ".join(f"{r:g}" for r in BucketLadder().ratios)
    raise UserError(f"--keep {args.keep:g}: expected a ladder rung ({rungs})")
  print(f"generate {args.preset} on {topology.name} ({topology.accelerator_type}, {topology.chips} chips): "
        f"{args.resolution}^2, {args.refs} references at keep {args.keep:g}, {args.txt_len} text tokens, {args.dtype}, "
        "weights replicated, batch over the chips", flush=True)
  kw = dict(resolution=args.resolution, refs=args.refs, keep=args.keep, dtype=DTYPES[args.dtype],
            txt_len=args.txt_len, attention=args.attention)
  limit = args.batch or 256
  show = lambda p: print(f"  batch {p.batch_per_chip:>4}/chip: args {gib(p.argument_bytes)} GiB, temp "
                         f"{gib(p.temp_bytes)} GiB, total {gib(p.total_bytes)} GiB of {gib(topology.chip.usable_bytes)}"
                         f"{' (compiler: out of memory)' if p.error else ''}, compiled in {p.compile_seconds:.0f} s",
                         flush=True)
  if args.batch:
    from sparse_context_jax.plan.generate import plan_sampler
    plan = plan_sampler(cfg, topology, topology.devices(), batch_per_chip=args.batch, **kw)
    show(plan)
    ok = not plan.error and plan.total_bytes <= topology.chip.usable_bytes
    print(f"batch {args.batch} per chip: {'fits' if ok else 'does NOT fit'}")
    return 0 if ok else EXIT_DOES_NOT_FIT
  best, _ = largest_batch(cfg, topology, limit=limit, on_plan=show, **kw)
  print(f"largest batch per chip: {best}" + (f" ({best * topology.chips} per step on the slice)" if best else
                                             ": not even one example fits"))
  return 0 if best else EXIT_DOES_NOT_FIT


def run_search(args, config, topology) -> int:
  from sparse_context_jax.plan.search import plot, search
  print(f"search {args.config} on {topology.name} ({topology.accelerator_type}): batch {config.train.batch_size}, "
        f"the rung with the most tokens; compiling the fastest until {args.fits} fit(s)", flush=True)
  hbm = topology.chip.usable_bytes
  rows = search(config, topology, fits_wanted=args.fits, max_compiles=args.max_compiles, on_candidate=lambda c: print(
      f"  compiled {c.mesh} {c.remat} {'scan' if c.scan else 'unrolled'}: {gib(c.plan.total_bytes)} GiB"
      f"{' (out of memory)' if c.plan.error else ''}", file=sys.stderr, flush=True))
  head = (f"{'rank':>4} {'data x fsdp x tensor':>20} {'remat':>13} {'layers':>8} {'compute s':>9} {'comm s':>8} "
          f"{'step s':>8} {'MFU':>5} {'GiB/chip':>8}  fits")
  print(head + "\n" + "-" * len(head))
  for i, c in enumerate(rows, 1):
    e, p = c.estimate, c.plan
    mem = "-" if p is None else gib(p.total_bytes)
    ok = "?" if p is None else ("yes" if not p.error and p.total_bytes <= hbm else "NO")
    print(f"{i:>4} {' x '.join(map(str, c.mesh)):>20} {c.remat:>13} {'scan' if c.scan else 'unrolled':>8} "
          f"{e.compute_seconds:>9.4g} {e.comm_seconds:>8.4g} {e.step_seconds:>8.4g} {e.mfu:>5.0%} {mem:>8}  {ok}")
  plot(rows, args.plot, f"{args.config} on {topology.name}", hbm)
  chosen = next((c for c in rows if c.plan is not None and not c.plan.error and c.plan.total_bytes <= hbm), None)
  print(f"plot: {args.plot}")
  if chosen is None:
    print("no compiled candidate fits")
    return EXIT_DOES_NOT_FIT
  print(f"chosen (fastest that fits, {chosen.estimate.step_seconds:.4g} s est., MFU {chosen.estimate.mfu:.0%}): "
        + " ".join(chosen.overrides()))
  return 0
