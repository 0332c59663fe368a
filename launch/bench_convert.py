"""Speed and memory benchmark of the weight converter (a script, not a test): a full-size random bfloat16
checkpoint is generated (`--model flux2-klein-4b`: the transformer, diffusers layout by default, ~7.75 GB;
`--model qwen3-4b`: a Qwen3-4B text-encoder folder as transformers writes it, ~8.04 GB), its disk's own speeds
measured with `dd` (O_DIRECT, so the page cache neither helps nor hides the disk) and by a copy that reads and
writes at once (the bound of any converter, which must do both), then converted by this tree
and, with --before REF, by an older commit checked out in a temporary git worktree; finally loaded onto 8 fake
CPU devices with FSDP sharding (--load). Each step runs in its own process under `/usr/bin/time -v`.

    <test venv>/bin/python launch/bench_convert.py [--model qwen3-4b] [--dir /tmp] [--before 32856c5]
        [--repeats 3] [--load] [--keep]

Before each conversion the checkpoint's pages are dropped from the page cache (posix_fadvise, this file only), so
every converter reads from the disk. Needs ~2.5x the checkpoint size free under --dir; everything it writes is
deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENERATE = textwrap.dedent("""
    import json, os, sys, numpy as np, ml_dtypes
    from sparse_context_jax import preset
    from sparse_context_jax.convert import ModelSpec
    from sparse_context_jax.convert.kinds import kind_of
    from sparse_context_jax.convert.safetensors_io import SafetensorsWriter
    from sparse_context_jax.convert.sources import BFL_PREFIX
    from sparse_context_jax.encoders.tiny_tokenizers import save_tiny_tokenizer
    from sparse_context_jax.text import DecoderConfig
    out, model, layout = sys.argv[1:4]
    if model == "qwen3-4b":   # a transformers text-encoder folder: config.json, weights, tokenizer
      cfg = DecoderConfig(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=2560,
                          intermediate_size=9728, num_hidden_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                          rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True)
      os.makedirs(out)
      with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(kind_of(cfg).to_dict(cfg), f)
      save_tiny_tokenizer("qwen3", out)
      path, layout, prefix = os.path.join(out, "model.safetensors"), "causal-lm", ""
    else:
      cfg, path = preset(model), out
      prefix = BFL_PREFIX if layout == "bfl" else ""
    shapes = ModelSpec(cfg).expected_torch_shapes(layout)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    w = SafetensorsWriter(path, [(prefix + k, bf16, s) for k, s in shapes.items()], {"format": "pt"})
    # Random normal bfloat16 values: one 32 Mi-value block read at a random offset per tensor (fast, and no two
    # tensors alike), so generation is bound by disk writes.
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(2**25, dtype=np.float32) * 0.02).astype(bf16)
    for k, s in shapes.items():
      n, start = int(np.prod(s)), int(rng.integers(block.size))
      w.write(prefix + k, np.tile(block, (start + n) // block.size + 1)[start:start + n].reshape(s))
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


def timed(argv: list[str], env: dict | None = None, root: str = ROOT) -> tuple[float, float, float, str]:
  """(wall seconds, CPU seconds, peak RSS GiB, stdout) of one command under /usr/bin/time -v."""
  r = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, cwd=root,
                     env={**os.environ, "PYTHONPATH": root, **(env or {})})
  if r.returncode:
    sys.exit(f"command failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-3000:]}")
  field = lambda name: re.search(rf"{re.escape(name)}: ([\d.:]+)", r.stderr).group(1)
  h, m, s = re.fullmatch(r"(?:(\d+):)?(\d+):([\d.]+)", field("Elapsed (wall clock) time (h:mm:ss or m:ss)")).groups()
  cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
  return int(h or 0) * 3600 + int(m) * 60 + float(s), cpu, int(field("Maximum resident set size (kbytes)")) / 2**20, \
      r.stdout


def dd_mb_s(args: list[str]) -> float:
  """The MB/s of one `dd` run (from the bytes and seconds it reports)."""
  r = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
  nbytes, seconds = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", r.stderr, re.M).groups()
  return int(nbytes) / 1e6 / float(seconds)


def pipelined_copy_mb_s(src: str, dst: str, nbytes: int | None = None, chunk: int = 64 << 20) -> float:
  """The MB/s of copying `src` (its first `nbytes`; default: all of it) to a new file `dst` with reads and writes
  overlapped (one thread reads while the other writes, both O_DIRECT, 4 buffers): the disk's own bound for a
  converter, which must read and write every byte. The whole checkpoint by default, as the converter moves it: a
  shorter copy can flatter the disk (on this project's VM, minutes apart: 2 GB at 1304 MB/s, all 7.5 GiB at 982)."""
  free, full = queue.Queue(), queue.Queue()
  for _ in range(4):
    free.put(mmap.mmap(-1, chunk))   # page-aligned, as O_DIRECT needs
  rfd = os.open(src, os.O_RDONLY | os.O_DIRECT)
  wfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
  size = os.path.getsize(src)
  nbytes = min(nbytes or size, size) // chunk * chunk

  def read():
    for offset in range(0, nbytes, chunk):
      buf = free.get()
      os.preadv(rfd, [buf], offset)
      full.put((offset, buf))
    full.put(None)

  try:
    start = time.perf_counter()
    reader = threading.Thread(target=read)
    reader.start()
    while (item := full.get()) is not None:
      os.pwrite(wfd, item[1], item[0])
      free.put(item[1])
    os.fsync(wfd)
    seconds = time.perf_counter() - start
    reader.join()
  finally:
    os.close(rfd)
    os.close(wfd)
    os.remove(dst)
  return nbytes / 1e6 / seconds


def drop_cached(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint and its conversions go")
  parser.add_argument("--model", choices=("flux2-klein-4b", "qwen3-4b"), default="flux2-klein-4b",
                      help="what to generate: a transformer file or a text-encoder folder")
  parser.add_argument("--layout", choices=("diffusers", "bfl"), default="diffusers",
                      help="of a generated transformer file")
  parser.add_argument("--repeats", type=int, default=1, help="conversions per tree (the page cache dropped each)")
  parser.add_argument("--before", metavar="REF", help="also convert with this git commit (e.g. 32856c5)")
  parser.add_argument("--load", action="store_true", help="also load the conversion onto 8 fake CPU devices")
  parser.add_argument("--keep", action="store_true", help="keep the generated files")
  args = parser.parse_args()
  py = sys.executable
  sys.path.insert(0, ROOT)
  need = 2.5 * 8.1e9
  if not os.path.isdir(args.dir):
    sys.exit(f"--dir {args.dir} is not a directory")
  free = shutil.disk_usage(args.dir).free
  if free < need:
    sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; the benchmark needs {need / 1e9:.1f} GB")

  work = tempfile.mkdtemp(prefix="scj-bench-convert-", dir=args.dir)
  src = os.path.join(work, args.model if args.model == "qwen3-4b" else f"{args.model}.safetensors")
  weights = os.path.join(src, "model.safetensors") if args.model == "qwen3-4b" else src
  rows, notes = [], []
  try:
    timed([py, "-c", GENERATE, src, args.model, args.layout])
    size = os.path.getsize(weights)
    drop_cached(weights)
    disk_read = dd_mb_s([f"if={weights}", "of=/dev/null", "bs=64M", "iflag=direct"])
    copy = os.path.join(work, "dd-copy")
    disk_copy = dd_mb_s([f"if={weights}", f"of={copy}", "bs=64M", "count=32", "iflag=direct", "oflag=direct"])
    os.remove(copy)
    drop_cached(weights)
    disk_pipelined = pipelined_copy_mb_s(weights, copy)
    imp = timed([py, "-c", IMPORT_ONLY])
    rows.append(("python + jax + package import only", *imp[:3]))
    trees = [("this tree", ROOT)]
    if args.before:
      old = os.path.join(work, "before")
      subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old, args.before], check=True,
                     capture_output=True)
      trees.insert(0, (f"commit {args.before}", old))
    for (name, root), repeat in ((t, r) for t in trees for r in range(args.repeats)):
      out = os.path.join(work, f"converted-{len(rows)}")
      drop_cached(weights)
      s, cpu, rss, _ = timed([py, "-m", "sparse_context_jax", "convert", src, out, "--dtype", "bfloat16"], root=root)
      rows.append((f"convert --dtype bfloat16 ({name})", s, cpu, rss))
      if repeat:
        shutil.rmtree(out)
        continue
      out_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
      notes.append(f"{name}: converted folder {out_size / 1e9:.2f} GB")
      if root == ROOT and args.load:
        s, cpu, rss, load_out = timed([py, "-c", LOAD, out],
                                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
        rows.append(("load_model, 8 fake CPU devices, FSDP", s, cpu, rss))
        notes.append(load_out.strip().replace("LOADED", "load_model:"))
      shutil.rmtree(out)
  finally:
    if args.before:
      subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", os.path.join(work, "before")],
                     capture_output=True)
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)

  gib = size / 2**30
  what = "Qwen3-4B text encoder" if args.model == "qwen3-4b" else f"{args.model}, {args.layout} layout"
  print(f"{what}, bfloat16: {size / 1e9:.2f} GB ({gib:.2f} GiB) checkpoint; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  print(f"disk (dd, O_DIRECT): read {disk_read:.0f} MB/s; copy (read + write, 2.1 GB) {disk_copy:.0f} MB/s; "
        f"a copy of the whole checkpoint with reads and writes overlapped {disk_pipelined:.0f} MB/s")
  for n in notes:
    print(n)
  # "MB/s past import": the rate once the interpreter and its libraries are loaded (wall time less the import-only
  # step's), to compare with the disk's own copy.
  head = (f"{'step':<48} {'wall s':>7} {'MB/s':>6} {'MB/s past import':>16} {'CPU s':>6} {'peak RSS GiB':>13} "
          f"{'RSS / ckpt':>10}")
  print(head)
  print("-" * len(head))
  start = imp[0]
  for name, s, cpu, rss in rows:
    moved = name.startswith(("convert", "load"))
    rate = f"{size / 1e6 / s:>6.0f}" if moved else f"{'-':>6}"
    past = f"{size / 1e6 / (s - start):>16.0f}" if moved and s > start else f"{'-':>16}"
    print(f"{name:<48} {s:>7.1f} {rate} {past} {cpu:>6.1f} {rss:>13.2f} {rss / gib:>10.2f}")
  print("(on fake CPU devices the devices' memory is host memory: load_model's RSS includes the whole model)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
