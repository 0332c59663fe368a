"""Memory benchmark of the weight converter (a script, not a test): a full-size random bfloat16 flux2-klein-4b
checkpoint in BFL layout (~7.8 GB) is generated, converted, and loaded onto 8 fake CPU devices with FSDP sharding.
Each step runs in its own process, measured with `/usr/bin/time -v` (wall time, peak RSS).

    <test venv>/bin/python launch/bench_convert.py [--dir /tmp] [--keep]

Needs ~2.2x the checkpoint size free under --dir; everything it writes is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENERATE = textwrap.dedent("""
    import sys, numpy as np, ml_dtypes
    from sparse_context_jax import preset
    from sparse_context_jax.convert import ModelSpec
    from sparse_context_jax.convert.safetensors_io import SafetensorsWriter
    from sparse_context_jax.convert.sources import BFL_PREFIX
    shapes = ModelSpec(preset("flux2-klein-4b")).expected_torch_shapes("bfl")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    w = SafetensorsWriter(sys.argv[1], [(BFL_PREFIX + k, bf16, s) for k, s in shapes.items()], {"format": "pt"})
    # Random normal bfloat16 values: one 32 Mi-value block read at a random offset per tensor (fast, and no two
    # tensors alike), so generation is bound by disk writes.
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(2**25, dtype=np.float32) * 0.02).astype(bf16)
    for k, s in shapes.items():
      n, start = int(np.prod(s)), int(rng.integers(block.size))
      w.write(BFL_PREFIX + k, np.tile(block, (start + n) // block.size + 1)[start:start + n].reshape(s))
    w.close()
""")

IMPORT_ONLY = "import sparse_context_jax, jax; jax.devices()"

LOAD = textwrap.dedent("""
    import sys, time, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from flax import nnx
    from sparse_context_jax import load_model
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    t = time.perf_counter()
    model = load_model(sys.argv[1], dtype=jnp.bfloat16, mesh=mesh)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(leaves)
    per_device = {}
    for a in leaves:
      for s in a.addressable_shards:
        per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
    total = sum(a.nbytes for a in leaves)
    print(f"LOADED {len(jax.devices())} devices, {total / 2**30:.2f} GiB of parameters, "
          f"max {max(per_device.values()) / 2**30:.2f} GiB per device, {time.perf_counter() - t:.1f} s")
""")


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
  """(wall seconds, peak RSS GiB, stdout) of one command under /usr/bin/time -v."""
  r = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
  if r.returncode:
    sys.exit(f"command failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-3000:]}")
  rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
  h, m, s = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)",
                      r.stderr).groups()
  return int(h or 0) * 3600 + int(m) * 60 + float(s), rss_kb / 2**20, r.stdout


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint and its conversion go")
  parser.add_argument("--keep", action="store_true", help="keep the generated files")
  args = parser.parse_args()
  py = sys.executable
  sys.path.insert(0, ROOT)
  from sparse_context_jax import count_params, preset
  need = 2.2 * 2 * count_params(preset("flux2-klein-4b"))
  free = shutil.disk_usage(args.dir).free
  if free < need:
    sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; the benchmark needs {need / 1e9:.1f} GB")

  work = tempfile.mkdtemp(prefix="scj-bench-convert-", dir=args.dir)
  src, out = os.path.join(work, "flux-2-klein-4b.safetensors"), os.path.join(work, "converted")
  try:
    gen_s, gen_rss, _ = timed([py, "-c", GENERATE, src])
    size = os.path.getsize(src)
    imp_s, imp_rss, _ = timed([py, "-c", IMPORT_ONLY])
    conv_s, conv_rss, conv_out = timed([py, "-m", "sparse_context_jax", "convert", src, out, "--dtype", "bfloat16"])
    load_s, load_rss, load_out = timed([py, "-c", LOAD, out],
                                       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)

  gib = size / 2**30
  print(f"flux2-klein-4b, BFL layout, bfloat16: {size / 1e9:.2f} GB ({gib:.2f} GiB) checkpoint, "
        f"{out_size / 1e9:.2f} GB converted; {os.cpu_count()} CPUs")
  print(conv_out.strip())
  print(load_out.strip().replace("LOADED", "load_model:"))
  head = f"{'step':<40} {'wall s':>8} {'MB/s':>8} {'peak RSS GiB':>13} {'RSS / ckpt':>10}"
  print(head)
  print("-" * len(head))
  rows = [("generate checkpoint (not measured)", gen_s, gen_rss),
          ("python + jax + package import only", imp_s, imp_rss),
          ("convert --dtype bfloat16", conv_s, conv_rss),
          ("load_model, 8 fake CPU devices, FSDP", load_s, load_rss)]
  for name, s, rss in rows:
    print(f"{name:<40} {s:>8.1f} {size / 1e6 / s:>8.0f} {rss:>13.2f} {rss / gib:>10.2f}")
  print("(on fake CPU devices the devices' memory is host memory: load_model's RSS includes the whole model)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
