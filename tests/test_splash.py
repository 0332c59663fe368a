"""attention_impl="splash": the Pallas TPU kernel (interpreted on the CPU) equals XLA's attention with bucket
padding excluded, alone, in the model, and in the sharded train step; "auto" picks one per platform."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from conftest import as_jax, jitted, jax_model
from sparse_context_jax.model import splash
from sparse_context_jax.model.blocks import attention, resolve_attention
from test_padding import _padded_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(B=3, S=37, H=2, Dh=16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(B, S, H, Dh)), jnp.float32) for _ in range(3)]


@pytest.mark.parametrize("kv_len", [None, (37, 20, 1)])
def test_kernel_equals_xla_with_padded_keys(kv_len):
  q, k, v = _qkv()
  kv_len = None if kv_len is None else jnp.asarray(kv_len, jnp.int32)
  f = lambda impl: jax.jit(lambda q, k, v: attention(q, k, v, kv_len, impl))
  want, got = f("xla")(q, k, v), f("splash")(q, k, v)
  assert ref.rel_err(np.asarray(got), np.asarray(want)) <= 1e-5
  loss = lambda impl: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, kv_len, impl))),
                                       argnums=(0, 1, 2)))
  for g, w in zip(loss("splash")(q, k, v), loss("xla")(q, k, v)):
    assert ref.rel_err(np.asarray(g), np.asarray(w)) <= 1e-5


def test_sequence_is_rounded_up_to_the_kernel_block():
  assert [splash.padded_length(s) for s in (1, 128, 129, 4608)] == [128, 128, 256, 4608]


@pytest.mark.parametrize("name", ["flux1-kontext", "flux2-klein-2ref"])
def test_model_with_padded_buckets_equals_xla(name):
  padded, lengths, _ = _padded_batch(name)
  want = jitted(name)(padded)
  graphdef_model = jax_model(name, attention_impl="splash")
  got = np.asarray(jax.jit(lambda x: graphdef_model(**x))(as_jax(padded)))
  for b, n in enumerate(lengths):
    assert ref.rel_err(got[b, :n], want[b, :n]) <= 1e-5


def test_auto_picks_per_platform():
  assert resolve_attention("auto", jnp.bfloat16, "tpu") == "splash"
  assert resolve_attention("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert resolve_attention("auto", jnp.float32, "gpu") == "xla"   # cuDNN's fused kernel takes no float32
  assert resolve_attention("auto", jnp.bfloat16, "cpu") == "xla"
  assert resolve_attention("cudnn", jnp.float32, "tpu") == "cudnn"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    resolve_attention("flash", jnp.float32)


SHARDED = r"""
import jax, numpy as np
from sparse_context_jax.parallel import make_mesh
from sparse_context_jax.train import config as C
from sparse_context_jax.train.objective import ladder
from sparse_context_jax.train.state import init_state, setup
from sparse_context_jax.train.step import compile_step
from test_train_step import BASE, GRID, TINY, make_batch

def one_step(impl):
  config = C.apply_overrides(C.load(TINY), BASE + ["mesh=(2, 1, 2)", f"model.attention_impl={impl}"])
  cfg = C.model_config(config)
  s = setup(config, cfg, make_mesh(config.mesh, jax.devices()[:4]))
  state = init_state(config, cfg, s)
  batch = {k: jax.numpy.asarray(v) for k, v in make_batch(cfg).items()}
  rung = ladder(config.objective).at(0.25, (GRID,) * 2)
  step = compile_step(s, config, rung, batch)
  text = step.lower(state, batch).as_text()
  state, metrics = step(state, batch)
  return float(metrics["loss"]), float(metrics["grad_norm"]), text

loss_x, norm_x, _ = one_step("xla")
loss_s, norm_s, text = one_step("splash")
assert "sdy.manual_computation" in text or "shard_map" in text, "the kernel is not in a shard_map"
assert abs(loss_s - loss_x) <= 1e-5 * abs(loss_x), (loss_s, loss_x)
assert abs(norm_s - norm_x) <= 1e-5 * abs(norm_x), (norm_s, norm_x)
print("ok", loss_x, loss_s, norm_x, norm_s)
"""


@pytest.mark.slow   # minutes here; the unsharded splash parity tests run by default
def test_sharded_train_step_equals_xla():
  """Heads over `tensor`, batch over `data` (4 fake CPU devices): one step of the tiny config, splash vs XLA."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
