"""`convert` for the FLUX VAEs (BFL `ae.safetensors`, diffusers `vae/` folders) and `load_vae`.

A VAE is small (84M parameters), so it is read whole, checked strictly against the VAE tables, and written as
`OUT/config.json` (`{"kind": "vae", ...}`) plus an orbax checkpoint of every variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparse_context_jax.convert.output import atomic_output
from sparse_context_jax.convert.state_dict import CheckpointError, _fmt_keys
from sparse_context_jax.convert.vae_tables import IGNORED, vae_params_from_state_dict, vae_variables
from sparse_context_jax.model.vae import AutoencoderKL, VAEConfig

KIND = "vae"
_LAYOUT_PROBES = {"bfl": "encoder.down.0.block.0.conv1.weight", "diffusers": "encoder.down_blocks.0.resnets.0.conv1.weight"}
VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight")


def is_vae(keys, folder_config: Mapping | None) -> bool:
  if folder_config is not None and str(folder_config.get("_class_name", "")).startswith("Autoencoder"):
    return True
  return any(k in set(keys) for k in VAE_KEYS)


def _layout(keys, what: str) -> str:
  found = [layout for layout, probe in _LAYOUT_PROBES.items() if probe in set(keys)]
  if len(found) != 1:
    raise CheckpointError(f"{what} looks like a VAE but has neither {_LAYOUT_PROBES['bfl']} (BFL) nor "
                          f"{_LAYOUT_PROBES['diffusers']} (diffusers)" if not found else
                          f"{what} mixes BFL and diffusers VAE key names")
  return found[0]


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], layout: str, what: str) -> VAEConfig:
  """A released-style VAE from names and shapes (norm groups 32; FLUX.1 scale and shift)."""
  level = (lambda i: f"encoder.down.{i}.block") if layout == "bfl" else (lambda i: f"encoder.down_blocks.{i}.resnets")
  channels, i = [], 0
  while f"{level(i)}.0.conv1.weight" in shapes:
    channels.append(shapes[f"{level(i)}.0.conv1.weight"][0])
    i += 1
  layers = sum(1 for k in shapes if k.startswith(f"{level(0)}.") and k.endswith(".conv1.weight"))
  if not channels or "decoder.conv_in.weight" not in shapes:
    raise CheckpointError(f"{what}: cannot infer the VAE architecture; pass --config (a diffusers VAE config.json)")
  flux2 = "bn.running_mean" in shapes
  quant = ("encoder.quant_conv.weight" if layout == "bfl" else "quant_conv.weight") in shapes
  post = ("decoder.post_quant_conv.weight" if layout == "bfl" else "post_quant_conv.weight") in shapes
  base = dict(family="flux2" if flux2 else "flux1", block_out_channels=tuple(channels), layers_per_block=layers,
              latent_channels=shapes["decoder.conv_in.weight"][1], use_quant_conv=quant, use_post_quant_conv=post)
  if flux2:
    base.update(scaling_factor=1.0, shift_factor=0.0)
  try:
    return VAEConfig(**base)
  except ValueError as e:
    raise CheckpointError(f"{what}: no released-style VAE fits its names and shapes ({e}); pass --config") from None


def _config(shapes, layout, what, folder_config, config_path) -> VAEConfig:
  d = folder_config
  if config_path is not None:
    try:
      d = json.loads(Path(config_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"cannot read --config {config_path}: {e}") from None
  if d is None:
    return infer_vae_config(shapes, layout, what)
  try:
    return VAEConfig.from_dict({k: v for k, v in d.items() if k != "kind"}) if d.get("kind") == KIND \
        else VAEConfig.from_diffusers(d)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{what}: VAE config: {e}") from None


def convert_vae(source, out, *, dtype: np.dtype, config: str | None, force: bool) -> VAEConfig:
  """Converts an open `TensorSource` holding a VAE into `out` (see the module docstring)."""
  what = source.description
  keys = source.keys()
  layout = _layout(keys, what)
  shapes = {k: source.shape(k) for k in keys}
  cfg = _config(shapes, layout, what, source.config, config)
  bad = [k for k in keys if k not in IGNORED and source.dtype(k).kind != "f" and source.dtype(k) != jnp.bfloat16]
  if bad:
    raise CheckpointError(f"{what} has VAE tensors of non-float dtype: {_fmt_keys(bad)}")
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  sd = {k: source.read(k) for k in keys}
  params = vae_params_from_state_dict(cfg, sd, layout, vae_variables(abstract))
  with atomic_output(out, force=force, directory=True) as tmp:
    (tmp / "config.json").write_text(json.dumps({"kind": KIND, **cfg.to_dict()}, indent=2, sort_keys=True))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp / "params").absolute(), {k: np.asarray(v, dtype) for k, v in params.items()})
    checkpointer.wait_until_finished()
  return cfg


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
  path = Path(path)
  try:
    d = json.loads((path / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not a converted checkpoint: {e}") from None
  if d.get("kind") != KIND:
    raise CheckpointError(f"{path} is a converted transformer, not a VAE (load it with load_model)")
  return VAEConfig.from_dict({k: v for k, v in d.items() if k != "kind"})


def load_vae(path: str | os.PathLike, *, dtype=jnp.float32) -> AutoencoderKL:
  """The VAE of a directory written by `convert` (parameters and compute in `dtype`; BatchNorm statistics f32)."""
  cfg = read_vae_config(path)
  vae = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  graphdef, state = nnx.split(vae)
  flat = nnx.to_flat_state(state)
  target = {".".join(map(str, p)): jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in flat}
  try:
    got = ocp.StandardCheckpointer().restore((Path(path) / "params").absolute(), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"cannot restore the VAE parameters of {path}: {e}") from None
  state = nnx.from_flat_state([(p, v.replace(jnp.asarray(got[".".join(map(str, p))], v.dtype))) for p, v in flat])
  return nnx.merge(graphdef, state)
