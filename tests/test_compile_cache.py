"""The persistent compilation cache: a second process compiling the same train step reads it from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys, time
import jax
from sparse_context_jax import compile_cache
folder = compile_cache.enable(min_compile_seconds=0)
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
from sparse_context_jax.parallel import make_mesh
from sparse_context_jax.train import config as C
from sparse_context_jax.train.objective import ladder
from sparse_context_jax.train.state import setup
from sparse_context_jax.train.step import compile_step
from sparse_context_jax.plan.train import batch_spec, largest_grid
config = C.load(sys.argv[1])
cfg = C.model_config(config)
mesh = make_mesh(config.mesh, jax.devices())
static = setup(config, cfg, mesh)
grid = largest_grid(config)
batch = batch_spec(config, cfg, mesh, grid)
rung = ladder(config.objective).at(1.0, (grid,) * config.data.max_refs)
tic = time.perf_counter()
compile_step(static, config, rung, batch).lower(static.abstract, batch).compile()
print(json.dumps({"folder": folder, "seconds": time.perf_counter() - tic, "hits": len(hits)}))
"""


def _compile(cache, config="configs/tiny.py"):
  env = {**os.environ, "SCJ_COMPILE_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, config)], env=env, capture_output=True,
                     text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_compile_is_served_from_the_cache(tmp_path):
  first = _compile(tmp_path / "xla")
  assert first["folder"] == str(tmp_path / "xla") and first["hits"] == 0
  assert any((tmp_path / "xla").iterdir())
  second = _compile(tmp_path / "xla")
  assert second["hits"] >= 1


def test_off_disables_it(tmp_path, monkeypatch):
  from sparse_context_jax import compile_cache
  monkeypatch.setenv("SCJ_COMPILE_CACHE", "off")
  assert compile_cache.enable() is None
  monkeypatch.setenv("SCJ_COMPILE_CACHE", "")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_dir() == str(tmp_path / "sparse_context_jax" / "xla")
