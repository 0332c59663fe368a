"""VAE weight tables: diffusers / BFL `ae.safetensors` tensors <-> `AutoencoderKL` variables, in the rule language
of the transformer's tables (`rules.TensorRule`: one tensor, one variable, one transform).

`conv` (torch (out, in, kh, kw) <-> Flax (kh, kw, in, out)), `linear` ((out, in) <-> (in, out)), `conv1x1` (BFL's
1x1-conv attention projections (out, in, 1, 1) <-> Flax Linear (in, out)), `copy` (norms, biases, BatchNorm
statistics).
"""

from __future__ import annotations

from sparse_context_jax.convert.rules import TensorRule
from sparse_context_jax.model.vae import VAEConfig

IGNORED = {"bn.num_batches_tracked"}   # a BatchNorm counter, meaningless for inference


def vae_rules(cfg: VAEConfig, layout: str) -> list[TensorRule]:
  """One rule per torch tensor of the layout, covering every variable of ours."""
  if layout not in ("diffusers", "bfl"):
    raise ValueError(f"unknown VAE checkpoint layout {layout!r}; expected 'diffusers' or 'bfl'")
  bfl = layout == "bfl"
  rows: list[TensorRule] = []

  def conv(src, dst):
    rows.extend([TensorRule(f"{src}.weight", f"{dst}.kernel", "conv"), TensorRule(f"{src}.bias", f"{dst}.bias")])

  def norm(src, dst):
    rows.extend([TensorRule(f"{src}.weight", f"{dst}.scale"), TensorRule(f"{src}.bias", f"{dst}.bias")])

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
        rows.extend([TensorRule(f"{a}.{theirs_bfl if bfl else theirs}.weight", f"{part}.mid.attn.{ours}.kernel",
                                "conv1x1" if bfl else "linear"),
                     TensorRule(f"{a}.{theirs_bfl if bfl else theirs}.bias", f"{part}.mid.attn.{ours}.bias")])

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
    rows.extend([TensorRule("bn.running_mean", "bn_mean"), TensorRule("bn.running_var", "bn_var")])
  return rows

