"""Stacked layers (`model.layers.stacked`) run in order with `jax.lax.scan` (or unrolled),
keeping the hidden states a caller asks for."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



def run_layers(stack: nnx.Module | None, h: jax.Array, step: Callable[[nnx.Module, jax.Array], jax.Array], *,
               keep: Sequence[int], scan: bool = True) -> jax.Array:
  """Applies `step(layer, h)` for every layer; returns the hidden states `keep` stacked, (len(keep), *h.shape).

  Hidden state 0 is `h` itself, hidden state i the output of layer i (1-based), as transformers'
  `output_hidden_states`. Under scan each kept state is written into a preallocated buffer (slot `len(keep)` takes
  the states nobody keeps), so only the kept ones are ever stored.
  """
  depth = 0 if stack is None else jax.tree.leaves(nnx.state(stack))[0].shape[0]
  keep = [int(k) for k in keep]
  if any(not 0 <= k <= depth for k in keep):
    raise ValueError(f"hidden states {keep} asked of {depth} layers (expected indices 0..{depth})")
  if depth == 0 or not scan:
    states = [h]
    if depth:
      graphdef, state = nnx.split(stack)
      for i in range(depth):
        states.append(step(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)), states[-1]))
    return jnp.stack([states[k] for k in keep])

  slots = np.full(depth, len(keep), np.int32)
  for pos, k in enumerate(keep):
    if k > 0:
      slots[k - 1] = pos
  buf = jnp.zeros((len(keep) + 1, *h.shape), h.dtype)
  for pos, k in enumerate(keep):
    if k == 0:
      buf = buf.at[pos].set(h)
  graphdef, state = nnx.split(stack)

  def body(carry, xs):
    h, buf = carry
    layer_state, slot = xs
    h = step(nnx.merge(graphdef, layer_state), h)
    return (h, jax.lax.dynamic_update_index_in_dim(buf, h, slot, 0)), None

  (_, buf), _ = jax.lax.scan(body, (h, buf), (state, jnp.asarray(slots)))
  return buf[:len(keep)]
