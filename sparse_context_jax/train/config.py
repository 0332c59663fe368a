"""Train configs: `get_config(arg)` Python files, overrides `key=value` (type-checked), validation.

Everything a user can get wrong in a config is checked here, before a model is built or a program compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import ml_collections

from sparse_context_jax.convert.run import run_model_config
from sparse_context_jax.model.config import MMDiTConfig


class ConfigError(ValueError):
  """A config the train program cannot run: one line saying which key and what was expected."""


def load(spec: str) -> ml_collections.ConfigDict:
  """`path/to/file.py` or `path/to/file.py:ARG` -> `get_config(ARG)` of that file."""
  path, _, arg = spec.partition(":")
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} not found")
  # Configs import their base as `configs.base`: put the folder holding the configs package on the path.
  if (file.resolve().parent / "__init__.py").exists():
    root = str(file.resolve().parent.parent)
    if root not in sys.path:
      sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(f"_scj_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg)")
  try:
    config = module.get_config(arg or None)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"config {spec!r}: {e}") from None
  return config


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text   # a bare string


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` (dotted) from `text`, refusing unknown keys and values of another type."""
  *parents, leaf = key.split(".")
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in --config.{key})")
    node = node[name]
  if isinstance(node, (ml_collections.ConfigDict, dict)) and leaf in node:
    old = node[leaf]
  elif parents == ["model", "arch"] and leaf in {f.name for f in dataclasses.fields(MMDiTConfig)}:
    old = getattr(model_config(config), leaf)   # any architecture field overrides the preset's (e.g. reference_attention)
  else:
    raise ConfigError(f"unknown config key {key!r}")
  value = _parse_value(text)
  if isinstance(old, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
    value = value.lower() == "true"
  if isinstance(old, (tuple, list)) and isinstance(value, (int, float)) and not isinstance(value, bool):
    value = (value,)
  if isinstance(old, str) and not isinstance(value, str):
    value = text   # "--config.model.init=123" is the string "123"
  if isinstance(old, (tuple, list)):
    value = tuple(value) if isinstance(value, (tuple, list)) else value
  if old is not None and not _same_kind(old, value):
    raise ConfigError(f"--config.{key}={text}: expected a {type(old).__name__} like {old!r}")
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"--config.{key}={text}: {e}") from None


def _same_kind(old, new) -> bool:
  if isinstance(old, bool) or isinstance(new, bool):
    return isinstance(old, bool) and isinstance(new, bool)
  if isinstance(old, float):
    return isinstance(new, (int, float))
  if isinstance(old, (tuple, list)):
    return isinstance(new, (tuple, list))
  return isinstance(new, type(old)) or isinstance(old, (dict, ml_collections.ConfigDict))


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """`["model.dtype=float32", ...]` (the `--config.` prefix already removed)."""
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
    override(config, key, text)
  return config



def parse_with_overrides(parser, argv=None):
  """`parser.parse_known_args` for a script that also takes `--config.KEY=VALUE` overrides: (args, the overrides
  without their prefix); any other unknown argument is the parser's usual error."""
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are --config.KEY=VALUE)")
  return args, [a[len("--config."):] for a in extra]

# What a resumed run may change (dotted config keys or prefixes): how it runs, never what it trains. model.init is
# read only by a fresh run (a resume restores its own checkpoint), so it may move.
RESUME_MAY_CHANGE = ("train.steps", "train.grad_accum", "log.", "checkpoint.", "mesh", "sharding_rules.",
                     "model.remat", "model.scan_layers", "model.attention_impl", "model.init", "data.worker_count")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resume_changes(stored: dict, new: dict) -> tuple[dict, list[str]]:
  """Compares a run's stored config with the config it resumes with (both as JSON dicts). Raises `ConfigError`
  naming every changed key a resume may not change; returns the allowed changes {key: [old, new]} and warnings."""
  a, b = _flat(stored), _flat(new)
  changed = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
  allowed = lambda k: any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE)
  refused = {k: v for k, v in changed.items() if not allowed(k)}
  if refused:
    shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:6])
    more = f" (+{len(refused) - 6} more)" if len(refused) > 6 else ""
    raise ConfigError(f"the run's checkpoint was trained with another config: {shown}{more}; a resume may change "
                      "only steps, grad_accum, logging, checkpointing, the mesh, remat/scan/attention and data "
                      "workers (use a new --workdir to train something else)")
  warnings = []
  if "train.steps" in changed and b.get("train.schedule") == "cosine":
    old, new_steps = changed["train.steps"]
    warnings.append(f"train.steps {old} -> {new_steps} changes the cosine learning-rate schedule of the rest of "
                    "the run")
  return changed, warnings


def model_config(config) -> MMDiTConfig:
  try:
    return run_model_config(config)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from None


def validate(config, num_devices: int, num_processes: int = 1) -> None:
  """Raises `ConfigError` on the first problem a run would hit; needs no model, data or compile."""
  from sparse_context_jax.parallel.mesh import mesh_shape
  from sparse_context_jax.train.objective import ladder
  model_config(config)
  for key in ("dtype", "param_dtype"):
    if config.model[key] not in ("float32", "bfloat16"):
      raise ConfigError(f"model.{key}={config.model[key]!r} (expected 'float32' or 'bfloat16')")
  if config.model.remat not in ("none", "full", "dots", "dots_no_batch"):
    raise ConfigError(f"model.remat={config.model.remat!r} (expected none, full, dots or dots_no_batch)")
  if config.model.attention_impl not in ("", "xla", "cudnn", "splash", "auto"):
    raise ConfigError(f"model.attention_impl={config.model.attention_impl!r} (expected '', xla, cudnn, splash or "
                      "auto)")
  if config.model.init and not (Path(config.model.init) / "config.json").is_file():
    raise ConfigError(f"model.init={config.model.init!r}: no converted checkpoint there (expected the output of "
                      "`convert`, a folder with config.json)")
  try:
    data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  t = config.train
  if t.batch_size <= 0 or t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} must be a positive multiple of train.grad_accum="
                      f"{t.grad_accum}")
  if (t.batch_size // t.grad_accum) % (data * fsdp):
    raise ConfigError(f"micro-batch {t.batch_size // t.grad_accum} (train.batch_size / train.grad_accum) is not "
                      f"divisible by the data axes data x fsdp = {data} x {fsdp} = {data * fsdp}")
  if t.batch_size % num_processes:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {num_processes} processes (each "
                      "reads an equal share of every global batch)")
  if t.steps <= 0 or t.warmup_steps < 0 or t.lr <= 0:
    raise ConfigError(f"train.steps={t.steps}, warmup_steps={t.warmup_steps}, lr={t.lr}: expected > 0, >= 0, > 0")
  if t.schedule not in ("cosine", "constant"):
    raise ConfigError(f"train.schedule={t.schedule!r} (expected 'cosine' or 'constant')")
  if not 0 <= t.ema_decay < 1:
    raise ConfigError(f"train.ema_decay={t.ema_decay} (expected 0 <= decay < 1; 0 disables EMA)")
  if not 0 <= config.lora.dropout < 1:
    raise ConfigError(f"lora.dropout={config.lora.dropout} (expected 0 <= dropout < 1; 0 disables it)")
  o = config.objective
  try:
    ladder(o)
  except ValueError as e:
    raise ConfigError(f"objective.ladder: {e}") from None
  if o.keep_dist not in ("ladder", "uniform"):
    raise ConfigError(f"objective.keep_dist={o.keep_dist!r} (expected 'ladder' or 'uniform')")
  if not (0 < o.keep_low <= o.keep_high <= 1):
    raise ConfigError(f"keep-ratio distribution [{o.keep_low}, {o.keep_high}] (objective.keep_low, keep_high) "
                      "must lie in (0, 1] with low <= high")
  if not 0 <= o.dense_prob <= 1:
    raise ConfigError(f"objective.dense_prob={o.dense_prob} (expected a probability in [0, 1])")
  if not (math.isfinite(o.logit_std) and o.logit_std > 0):
    raise ConfigError(f"objective.logit_std={o.logit_std} (expected > 0)")
  if config.data.path and not Path(config.data.path).is_dir():
    raise ConfigError(f"data.path={config.data.path!r} is not a folder (expected the output of build-dataset, or "
                      "of precompute with data.encoder='latents')")
  if config.data.encoder == "latents":
    _check_latents(config)
  elif config.data.encoder != "pixels":
    raise ConfigError(f"data.encoder={config.data.encoder!r} (expected 'pixels' or 'latents')")
  elif config.data.text != "hashed":
    raise ConfigError(f"data.text={config.data.text!r}: pixel runs caption with the 'hashed' stand-in (real text "
                      "embeddings come from precompute: data.encoder='latents')")
  elif not config.data.path:
    _check_world_text(config)
  if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0 or config.log.every <= 0:
    raise ConfigError("checkpoint.every, checkpoint.keep and log.every must be > 0")
  rules = dict(config.sharding_rules)
  bad = {k: v for k, v in rules.items() if v not in (None, "data", "fsdp", "tensor")}
  if bad:
    raise ConfigError(f"sharding_rules {bad}: mesh axes are data, fsdp, tensor (or None)")


def _check_world_text(config) -> None:
  """The synthetic world's captions fit `data.txt_len` (the stand-in text reads one word per position; a shorter
  length would silently drop what the captions say about every reference past the first few)."""
  from sparse_context_jax.data.world import caption_words
  w = config.data.world
  words = caption_words(w.max_refs, tuple(w.tasks))
  if config.data.txt_len < words:
    raise ConfigError(f"data.txt_len={config.data.txt_len} is shorter than the synthetic world's longest caption "
                      f"({words} words with data.world.max_refs={w.max_refs}): set data.txt_len >= {words}")


def _check_latents(config) -> None:
  """data.encoder='latents': `data.path` is a latent folder whose tokens, text and references fit the model."""
  from sparse_context_jax.data.latent_pipeline import describe
  path, cfg = config.data.path, model_config(config)
  if not path:
    raise ConfigError("data.encoder='latents' needs data.path: a latent folder (the output of precompute)")
  try:
    info = describe(path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"data.path: {e}") from None
  where = f"data.path={path!r}"
  if 4 * info["latent_channels"] != cfg.in_channels:
    raise ConfigError(f"{where}: latents of {info['latent_channels']} channels pack into {4 * info['latent_channels']}"
                      f"-channel tokens, but the model's in_channels is {cfg.in_channels}")
  text = info["text"].get("embeddings")
  if text is None or len(text) != 2 or text[1] != cfg.context_dim:
    raise ConfigError(f"{where}: text_embeddings of shape {text} per example, expected (T, {cfg.context_dim}) "
                      "(the model's context_dim)")
  pooled = info["text"].get("pooled")
  if bool(cfg.pooled_dim) != (pooled is not None) or (pooled is not None and pooled != (cfg.pooled_dim,)):
    raise ConfigError(f"{where}: text_pooled of shape {pooled} per example, but the model's pooled_dim is "
                      f"{cfg.pooled_dim} (expected {(cfg.pooled_dim,) if cfg.pooled_dim else 'none'})")
  if info["ref_slots"] > config.data.max_refs:
    raise ConfigError(f"{where} has {info['ref_slots']} reference slots per example, more than data.max_refs="
                      f"{config.data.max_refs}")
