"""The train step: a pure function (state, batch) -> (state, metrics), jitted with explicit shardings and the
state donated. One compiled program per keep-ratio rung (the ratio fixes the packed sequence length)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparse_context_jax.parallel import batch_sharding, replicated
from sparse_context_jax.sparse.pack import SparsePacker
from sparse_context_jax.train.objective import draw_noise, loss_sums
from sparse_context_jax.train.state import Setup, schedule


def _micro_batches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B / n, ...), micro-batch a = rows a, a + n, ...: each micro-batch keeps the batch's spread
  over the data axes (a contiguous split would put a micro-batch on a few devices)."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def train_step(state: dict, batch: dict, *, graphdef, tx, packer: SparsePacker, config, ratio: float,
               grid: tuple[int, int]):
  objective, t = config.objective, config.train
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  # The whole batch's draws first: the micro-batches then split them with the examples, so any grad_accum
  # sums the same per-example losses (up to float rounding).
  batch = {**batch, **draw_noise(objective, key, batch)}

  def loss(params, micro):
    model = nnx.merge(graphdef, params)
    return loss_sums(model, packer, objective, micro, ratio, grid)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def accumulate(carry, micro):
    (lsum, wsum), g = grad_fn(state["params"], micro)
    gsum, ltot, wtot = carry
    return (jax.tree.map(jnp.add, gsum, g), ltot + lsum, wtot + wsum), None

  zeros = jax.tree.map(jnp.zeros_like, state["params"])
  (gsum, lsum, wsum), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), _micro_batches(batch, t.grad_accum))
  denom = jnp.maximum(wsum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, gsum)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new = {**state, "params": params, "opt": opt, "step": state["step"] + 1}
  if "ema" in state:
    d = t.ema_decay
    new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), state["ema"], params)
  metrics = {"loss": lsum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(t)(state["step"]),
             "examples": wsum}
  return new, metrics


def batch_shardings(s: Setup, batch: dict) -> dict:
  return jax.tree.map(lambda x: batch_sharding(s.mesh, x.ndim), batch)


def compile_step(s: Setup, packer: SparsePacker, config, ratio: float, grid: tuple[int, int], batch_spec: dict):
  """The jitted step for one keep-ratio rung: in/out shardings explicit, the state donated."""
  fn = functools.partial(train_step, graphdef=s.graphdef, tx=s.tx, packer=packer, config=config, ratio=ratio,
                         grid=grid)
  metrics_sh = {k: replicated(s.mesh) for k in ("loss", "grad_norm", "lr", "examples")}
  return jax.jit(fn, in_shardings=(s.shardings, batch_shardings(s, batch_spec)),
                 out_shardings=(s.shardings, metrics_sh), donate_argnums=0)
