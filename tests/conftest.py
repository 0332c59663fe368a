"""Shared fixtures: tiny diffusers references (built once per session) and their converted JAX twins."""

from __future__ import annotations

import functools
import os

# The test environment has the TPU runtime (for `plan`): without this jax would probe for a TPU in every process
# and print libtpu's warnings on stderr, which the one-line error checks read. Subprocesses inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Commands keep compiled programs in a persistent cache (compile_cache.py). launch/test.sh gives each run a fresh
# folder, shared by its workers and their subprocesses, so a program one test compiled (the tiny train step, say)
# is read back by the next and nothing outlives the run; a bare `pytest` compiles everything.
# tests/test_compile_cache.py uses folders of its own.
os.environ.setdefault("SCJ_COMPILE_CACHE", "off")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference as ref
from sparse_context_jax import MMDiT, compile_cache
from sparse_context_jax.convert import load_state_dict

compile_cache.enable()   # before anything compiles; None when off

# name -> (builder kwargs, input kwargs). Different head dims, block counts, guidance on/off, references of another
# size than the target, 1-3 references for FLUX.2; timesteps always differ per example.
TINY = {
    "flux1-kontext": (dict(family="flux1"), dict(refs=((3, 5),))),
    "flux1-schnell-like": (dict(family="flux1", guidance=False, heads=3, head_dim=32, axes=(8, 12, 12),
                                layers=(1, 3), pooled=16), dict(target=(3, 5), refs=((4, 4),), txt_len=5)),
    "flux2-klein-1ref": (dict(family="flux2"), dict(refs=((2, 3),))),
    "flux2-klein-2ref": (dict(family="flux2", heads=4, head_dim=8, axes=(2, 2, 2, 2), layers=(2, 1)),
                         dict(target=(3, 4), refs=((2, 3), (3, 2)), batch=3)),
    "flux2-dev-3ref": (dict(family="flux2", guidance=True, head_dim=24, axes=(6, 6, 6, 6), layers=(3, 1),
                            mlp_ratio=2.0), dict(refs=((2, 2), (3, 3), (1, 4)))),
}


@functools.lru_cache(maxsize=None)
def torch_model(name: str):
  kw = dict(TINY[name][0])
  family = kw.pop("family")
  return (ref.tiny_flux1 if family == "flux1" else ref.tiny_flux2)(**kw)


@functools.lru_cache(maxsize=None)
def jax_model(name: str, **model_kw) -> MMDiT:
  tm = torch_model(name)
  return load_state_dict(MMDiT(ref.config_of(tm), rngs=nnx.Rngs(0), **model_kw), ref.state_dict(tm))


@functools.lru_cache(maxsize=None)
def jitted(name: str, **model_kw):
  """`f(inputs dict) -> numpy output` of the converted model, jit-compiled (once per input shape)."""
  graphdef, state = nnx.split(jax_model(name, **model_kw))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))
  return lambda x: np.asarray(forward(state, as_jax(x)))


def inputs(name: str, **overrides) -> dict:
  return ref.make_inputs(ref.config_of(torch_model(name)), **{**TINY[name][1], **overrides})


def as_jax(x: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in x.items()}


@pytest.fixture(params=sorted(TINY))
def tiny_name(request):
  return request.param



def resumed_equals_straight(config, tmp_path, first: int) -> list[float]:
  """Trains `config` straight in tmp_path/a, and in tmp_path/b for `first` steps then resumed to the end; asserts
  the final parameters are bitwise equal and both logged the same (step, loss) curve; returns the losses."""
  from sparse_context_jax.train.loop import train
  from sparse_context_jax.train.metrics import read_metrics
  flat = lambda state: {jax.tree_util.keystr(p): np.asarray(v)
                        for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}
  straight = flat(train(config, str(tmp_path / "a")))
  train(config, str(tmp_path / "b"), stop_after=first)
  resumed = flat(train(config, str(tmp_path / "b")))
  assert straight.keys() == resumed.keys()
  for k in straight:
    np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)
  curve = lambda d: [(m["step"], m["loss"]) for m in read_metrics(tmp_path / d) if "loss" in m]
  assert curve("a") == curve("b")
  return [loss for _, loss in curve("a")]
