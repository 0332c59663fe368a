"""The train state and where it lives: model definition, optimizer, and the shardings of everything.

The state is a dict pytree `{params, opt, ema?, rng, step}` of pure arrays (what `jax.jit` and orbax see); with
LoRA (`config.lora.rank > 0`) it is `{params, lora, opt, ema?, rng, step}`: `params` the frozen base (same tree
as without LoRA, in `model.param_dtype`), `opt` and `ema` over `lora` only;
the model structure stays on the host as an `nnx` graphdef and is merged back inside the step. Parameters start
at random or from a converted checkpoint (`load_params`), read straight into their train shardings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import sparse_context_jax.lora as lora_lib
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.model.blocks import resolve_attention
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.parallel import param_shardings, replicated

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_kwargs(config, platform: str | None = None) -> dict:
  """The MMDiT options of a config; `attention_impl="auto"` made concrete for `platform` (the mesh's devices;
  default: jax's default backend)."""
  m = config.model
  return dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], scan_layers=m.scan_layers, remat=m.remat,
              attention_impl=resolve_attention(m.attention_impl or None, DTYPES[m.dtype], platform))


def schedule(train) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * end_lr_factor` at `steps`, or constant (`train`: the train
  section of a config)."""
  if train.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, train.lr, max(1, train.warmup_steps)),
                                 optax.constant_schedule(train.lr)], [train.warmup_steps])
  return optax.warmup_cosine_decay_schedule(0.0, train.lr, train.warmup_steps,
                                            max(train.steps, train.warmup_steps + 1),
                                            end_value=train.lr * train.end_lr_factor)


def _decay_mask(params):
  """Weight decay on matrices only (kernels, LoRA factors): never on norm scales and biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "lora_a", "lora_b"), params)


def lora_config(config):
  """`config.lora` when LoRA is on (rank > 0), else None."""
  c = config.get("lora")
  return c if lora_lib.enabled(c) else None


def build_model(config, cfg: MMDiTConfig, seed: int, platform: str | None = None) -> MMDiT:
  """The MMDiT of a config, its LoRA attached when `config.lora` is on (A from a key of its own, so the base
  parameters are those of the model without LoRA)."""
  model = MMDiT(cfg, rngs=nnx.Rngs(seed), **model_kwargs(config, platform))
  if lora_config(config) is not None:
    lora_lib.attach(model, lora_config(config), nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 0x10A)))
  return model


def split_state(model):
  """(graphdef, base params, LoRA params or None) of a model, as pure dicts."""
  graphdef, lora, params = nnx.split(model, nnx.LoRAParam, nnx.Param)
  lora = lora.to_pure_dict() or None
  return graphdef, params, lora


def optimizer(train) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(train.clip_norm),
                     optax.adamw(schedule(train), b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                                 mask=_decay_mask))


@dataclasses.dataclass
class Setup:
  """Everything static about a run: the model graph, the optimizer and the shardings of the state."""

  graphdef: nnx.GraphDef
  abstract: dict            # the state as jax.ShapeDtypeStruct with shardings (the orbax restore target)
  shardings: dict
  tx: optax.GradientTransformation
  mesh: Mesh


def setup(config, cfg: MMDiTConfig, mesh: Mesh) -> Setup:
  """The abstract state and its shardings, computed without allocating a parameter."""
  platform = mesh.devices.flat[0].platform
  abstract_model = nnx.eval_shape(lambda: build_model(config, cfg, 0, platform))
  graphdef, abstract_lora, abstract_params = nnx.split(abstract_model, nnx.LoRAParam, nnx.Param)
  rules = dict(config.sharding_rules)
  pure = lambda st: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), st.to_pure_dict())
  param_sh = param_shardings(mesh, abstract_params, rules).to_pure_dict()
  params = pure(abstract_params)
  shardings = {"params": param_sh, "rng": replicated(mesh), "step": replicated(mesh)}
  abstract = {"params": params, "rng": jax.eval_shape(lambda: jax.random.key_data(
      jax.random.key(0))), "step": jax.ShapeDtypeStruct((), jnp.int32)}
  trained, trained_sh = params, param_sh
  if lora_config(config) is not None:   # the optimizer and the EMA see the LoRA factors only
    trained, trained_sh = pure(abstract_lora), param_shardings(mesh, abstract_lora, rules).to_pure_dict()
    shardings["lora"], abstract["lora"] = trained_sh, trained
  tx = optimizer(config.train)
  opt = jax.eval_shape(tx.init, trained)
  # Moments follow their parameter; scalars (counts) are replicated (optax would put them on device 0).
  shardings["opt"], abstract["opt"] = _like_params(opt, trained, trained_sh, replicated(mesh)), opt
  if config.train.ema_decay:
    shardings["ema"], abstract["ema"] = trained_sh, trained
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  return Setup(graphdef, abstract, shardings, tx, mesh)


def _like_params(opt, params, param_sh, scalar_sh):
  """Shardings of an optimizer state: subtrees shaped like `params` take `param_sh`, other leaves scalar_sh."""
  params_def = jax.tree.structure(params)

  def visit(node):
    if jax.tree.structure(node) == params_def:
      return param_sh
    if isinstance(node, jax.ShapeDtypeStruct):
      return scalar_sh
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(visit(x) for x in node))
    if isinstance(node, (tuple, list)):
      return type(node)(visit(x) for x in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return jax.tree.map(lambda _: scalar_sh, node)

  return visit(opt)


def load_params(config, cfg: MMDiTConfig, static: Setup) -> dict:
  """The parameters of the converted checkpoint `config.model.init` (the `convert` output), in `param_dtype`,
  as the pure dict the state holds, already in `static.shardings["params"]`.

  Read layer by layer straight into those shardings (`load_model` with the train mesh and rules), so no host or
  device ever holds more than its share of the model plus one layer. Raises `CheckpointError` when the
  checkpoint is unreadable or holds another model than `cfg` (naming the differing fields).
  """
  from sparse_context_jax.convert.checkpoint import load_model, read_config
  path = config.model.init
  stored = read_config(path)
  if not isinstance(stored, MMDiTConfig):
    raise CheckpointError(f"model.init={path!r} holds a converted {type(stored).__name__}, not a transformer")
  diff = [f"{f.name}={getattr(stored, f.name)!r} there, {getattr(cfg, f.name)!r} in the config"
          for f in dataclasses.fields(cfg) if getattr(stored, f.name) != getattr(cfg, f.name)]
  if diff:
    raise CheckpointError(f"model.init={path!r} holds another model than the train config's: {'; '.join(diff)}")
  kw = model_kwargs(config)
  del kw["dtype"]   # only the parameters are kept: their dtype is what matters
  model = load_model(path, dtype=kw.pop("param_dtype"), mesh=static.mesh, rules=dict(config.sharding_rules), **kw)
  params = nnx.state(model, nnx.Param).to_pure_dict()

  def same_place(key, a, want):
    assert a.sharding.is_equivalent_to(want, a.ndim), (jax.tree_util.keystr(key), a.sharding, want)
  jax.tree_util.tree_map_with_path(same_place, params, static.shardings["params"])
  return params


def init_state(config, cfg: MMDiTConfig, static: Setup, params=None) -> dict:
  """A fresh state, created directly in its shardings: random parameters from `config.seed`, or `params`
  (already sharded, e.g. from `load_params`; donated: they become the state's parameters without a copy)."""
  def make(p):
    _, base, lora = split_state(build_model(config, cfg, config.seed))
    p = base.to_pure_dict() if p is None else p   # unused random base weights are never computed (dead code)
    trained = p if lora is None else lora
    state = {"params": p, "opt": static.tx.init(trained), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(config.seed))}
    if lora is not None:
      state["lora"] = lora
    if config.train.ema_decay:
      state["ema"] = jax.tree.map(jnp.copy, trained)
    return state

  return jax.jit(make, out_shardings=static.shardings, donate_argnums=0)(params)
