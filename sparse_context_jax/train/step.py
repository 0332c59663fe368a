"""The train step: a pure function (state, batch) -> (state, metrics), jitted with explicit shardings and the
state donated. One compiled program per keep-ratio rung (the rung fixes the packed sequence length)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sparse_context_jax.lora as lora_lib
from sparse_context_jax.parallel import batch_sharding, replicated
from sparse_context_jax.programs import ProgramCache
from sparse_context_jax.sparse import Rung
from sparse_context_jax.train.objective import draw_noise, loss_sums
from sparse_context_jax.train.state import Setup, schedule

METRICS = ("loss", "grad_norm", "lr", "examples")
LORA_DROPOUT_STREAM = 0x10AD   # fold_in of the step key for the LoRA dropout keys


def _micro_batches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B / n, ...), micro-batch a = rows a, a + n, ...: each micro-batch keeps the batch's spread
  over the data axes (a contiguous split would put a micro-batch on a few devices)."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def train_step(state: dict, batch: dict, *, graphdef, tx, config, rung: Rung):
  objective, train = config.objective, config.train
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  # The whole batch's draws first: the micro-batches then split them with the examples, so any grad_accum
  # sums the same per-example losses (up to float rounding).
  batch = {**batch, **draw_noise(objective, key, batch, rung.grids[0])}

  # Full fine-tune: the gradient is over `params`; LoRA: over `lora`, the base `params` frozen (a constant here).
  trained = "lora" if "lora" in state else "params"
  dropout = float(config.lora.dropout) if trained == "lora" else 0.0
  if dropout:   # a key per example from a stream of its own: the draws above are the same with or without it
    B = batch["target"].shape[0]
    batch["lora_keys"] = jax.random.key_data(jax.random.split(jax.random.fold_in(key, LORA_DROPOUT_STREAM), B))

  def loss(weights, micro):
    parts = (state["params"], weights) if trained == "lora" else (weights,)
    model = nnx.merge(graphdef, *parts)
    if dropout:
      micro = dict(micro)
      lora_lib.with_dropout(model, dropout, micro.pop("lora_keys"))
    return loss_sums(model, objective, micro, rung)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def accumulate(carry, micro):
    (lsum, wsum), g = grad_fn(state[trained], micro)
    gsum, ltot, wtot = carry
    return (jax.tree.map(jnp.add, gsum, g), ltot + lsum, wtot + wsum), None

  zeros = jax.tree.map(jnp.zeros_like, state[trained])
  (gsum, lsum, wsum), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), _micro_batches(batch, train.grad_accum))
  denom = jnp.maximum(wsum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, gsum)
  updates, opt = tx.update(grads, state["opt"], state[trained])
  params = optax.apply_updates(state[trained], updates)
  new = {**state, trained: params, "opt": opt, "step": state["step"] + 1}
  if "ema" in state:
    d = train.ema_decay
    new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), state["ema"], params)
  metrics = {"loss": lsum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(train)(state["step"]),
             "examples": wsum}
  return new, metrics


def step_programs(static: Setup, config) -> ProgramCache:
  """The train step's programs, one per (rung, batch shapes): `programs(state, batch, rung=rung)`. In and out
  shardings explicit (the state's, the batch over the data axes, metrics replicated), the state donated."""
  def shardings(state, batch):
    batch_sh = jax.tree.map(lambda x: batch_sharding(static.mesh, x.ndim), batch)
    return (static.shardings, batch_sh), (static.shardings, {k: replicated(static.mesh) for k in METRICS})

  def fn(state, batch, **static_kw):
    # Traced under the mesh: kernels that shard themselves (model/splash.py's shard_map) read it from there.
    with jax.sharding.use_abstract_mesh(static.mesh.abstract_mesh):
      return train_step(state, batch, graphdef=static.graphdef, tx=static.tx, config=config, **static_kw)

  return ProgramCache(fn, "train_step", donate_argnums=(0,), shardings=shardings)


def compile_step(static: Setup, config, rung: Rung, batch_spec: dict):
  """The jitted step of one rung (arrays or `jax.ShapeDtypeStruct`s for `batch_spec`): to call, or to lower for
  XLA's counts or for another backend."""
  return step_programs(static, config).jit(static.abstract, batch_spec, rung=rung)
