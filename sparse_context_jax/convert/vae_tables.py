"""VAE weight tables: diffusers / BFL `ae.safetensors` tensors <-> `AutoencoderKL` parameters (flux_arch.md 4.3).

Every entry maps one torch tensor to one parameter through one small transform, so the table is its own
documentation: `conv` (torch (out, in, kh, kw) <-> Flax (kh, kw, in, out)), `linear` ((out, in) <-> (in, out)),
`conv1x1` (BFL's 1x1-conv attention projections (out, in, 1, 1) <-> Flax Linear (in, out)), `copy` (norms, biases,
BatchNorm statistics).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.convert.state_dict import CheckpointError, _fmt_keys
from sparse_context_jax.model.vae import VAEConfig

TRANSFORMS = {
    "conv": (lambda t: t.transpose(2, 3, 1, 0), lambda p: p.transpose(3, 2, 0, 1)),
    "linear": (lambda t: t.T, lambda p: p.T),
    "conv1x1": (lambda t: t[:, :, 0, 0].T, lambda p: p.T[:, :, None, None]),
    "copy": (lambda t: t, lambda p: p),
}


def vae_table(cfg: VAEConfig, layout: str) -> list[tuple[str, str, str]]:
  """[(torch key, parameter path, transform)] covering every tensor of the layout and every variable of ours."""
  if layout not in ("diffusers", "bfl"):
    raise ValueError(f"unknown VAE checkpoint layout {layout!r}; expected 'diffusers' or 'bfl'")
  bfl = layout == "bfl"
  rows: list[tuple[str, str, str]] = []

  def conv(src, dst):
    rows.extend([(f"{src}.weight", f"{dst}.kernel", "conv"), (f"{src}.bias", f"{dst}.bias", "copy")])

  def norm(src, dst):
    rows.extend([(f"{src}.weight", f"{dst}.scale", "copy"), (f"{src}.bias", f"{dst}.bias", "copy")])

  def resnet(src, dst, has_shortcut):
    for name in ("norm1", "norm2"):
      norm(f"{src}.{name}", f"{dst}.{name}")
    for name in ("conv1", "conv2"):
      conv(f"{src}.{name}", f"{dst}.{name}")
    if has_shortcut:
      conv(f"{src}.{'nin_shortcut' if bfl else 'conv_shortcut'}", f"{dst}.shortcut")

  def mid(part):
    src = f"{part}.mid" if bfl else f"{part}.mid_block"
    resnet(f"{src}.block_1" if bfl else f"{src}.resnets.0", f"{part}.mid.block_1", False)
    resnet(f"{src}.block_2" if bfl else f"{src}.resnets.1", f"{part}.mid.block_2", False)
    if cfg.mid_attention:
      a = f"{src}.attn_1" if bfl else f"{src}.attentions.0"
      norm(f"{a}.norm" if bfl else f"{a}.group_norm", f"{part}.mid.attn.norm")
      for ours, theirs_bfl, theirs in (("q", "q", "to_q"), ("k", "k", "to_k"), ("v", "v", "to_v"),
                                       ("proj", "proj_out", "to_out.0")):
        rows.extend([(f"{a}.{theirs_bfl if bfl else theirs}.weight", f"{part}.mid.attn.{ours}.kernel",
                      "conv1x1" if bfl else "linear"),
                     (f"{a}.{theirs_bfl if bfl else theirs}.bias", f"{part}.mid.attn.{ours}.bias", "copy")])

  def levels(part: str, kind: str, channels, blocks: int):
    """The ResNet levels of the encoder (kind "down") or decoder ("up"); ours and diffusers' count in order of
    computation, BFL's decoder counts from the output side."""
    cin = channels[0]
    for i, cout in enumerate(channels):
      b = i if kind == "down" else len(channels) - 1 - i
      for j in range(blocks):
        src = f"{part}.{kind}.{b}.block.{j}" if bfl else f"{part}.{kind}_blocks.{i}.resnets.{j}"
        resnet(src, f"{part}.{kind}.{i}.blocks.{j}", j == 0 and cin != cout)
      if i < len(channels) - 1:
        conv(f"{part}.{kind}.{b}.{kind}sample.conv" if bfl else f"{part}.{kind}_blocks.{i}.{kind}samplers.0.conv",
             f"{part}.{kind}.{i}.resample.conv")
      cin = cout

  ch, n = cfg.block_out_channels, cfg.layers_per_block
  conv("encoder.conv_in", "encoder.conv_in")
  levels("encoder", "down", ch, n)
  mid("encoder")
  norm("encoder.norm_out" if bfl else "encoder.conv_norm_out", "encoder.norm_out")
  conv("encoder.conv_out", "encoder.conv_out")
  conv("decoder.conv_in", "decoder.conv_in")
  mid("decoder")
  levels("decoder", "up", ch[::-1], n + 1)
  norm("decoder.norm_out" if bfl else "decoder.conv_norm_out", "decoder.norm_out")
  conv("decoder.conv_out", "decoder.conv_out")

  if cfg.use_quant_conv:
    conv("encoder.quant_conv" if bfl else "quant_conv", "quant_conv")
  if cfg.use_post_quant_conv:
    conv("decoder.post_quant_conv" if bfl else "post_quant_conv", "post_quant_conv")
  if cfg.family == "flux2":
    rows.extend([("bn.running_mean", "bn_mean", "copy"), ("bn.running_var", "bn_var", "copy")])
  return rows


IGNORED = {"bn.num_batches_tracked"}   # a BatchNorm counter, meaningless for inference


def vae_params_from_state_dict(cfg: VAEConfig, sd: Mapping[str, np.ndarray], layout: str,
                               shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Strict conversion of a whole VAE state dict; `shapes` are our variables' shapes (path -> shape)."""
  table = vae_table(cfg, layout)
  expected = {k for k, _, _ in table}
  present = set(sd) - IGNORED
  if expected != present:
    raise CheckpointError(f"{layout} VAE state dict does not match the config: missing "
                          f"{_fmt_keys(expected - present) or 'none'}; unexpected {_fmt_keys(present - expected) or 'none'}")
  out = {}
  for key, path, kind in table:
    value = TRANSFORMS[kind][0](np.asarray(sd[key]))
    if tuple(value.shape) != tuple(shapes[path]):
      raise CheckpointError(f"{layout} VAE tensor {key} {tuple(sd[key].shape)} does not fit {path} {shapes[path]}")
    out[path] = value
  if set(out) != set(shapes):
    raise AssertionError(f"VAE table misses variables: {sorted(set(shapes) - set(out))}")
  return out


def vae_state_dict_from_params(cfg: VAEConfig, params: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
  return {key: np.ascontiguousarray(TRANSFORMS[kind][1](np.asarray(params[path])))
          for key, path, kind in vae_table(cfg, layout)}


def vae_variables(vae) -> dict[str, tuple[int, ...]]:
  """Every variable of an `AutoencoderKL` (parameters and BatchNorm statistics): dotted path -> shape."""
  return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(vae))}


def load_vae_state_dict(vae, sd: Mapping[str, np.ndarray], layout: str = "diffusers"):
  """Loads a torch VAE state dict (diffusers or BFL layout) into `vae` in place and returns it."""
  params = vae_params_from_state_dict(vae.config, sd, layout, vae_variables(vae))
  for p, var in nnx.to_flat_state(nnx.state(vae)):
    var[...] = jnp.asarray(params[".".join(map(str, p))], var.dtype)
  return vae
