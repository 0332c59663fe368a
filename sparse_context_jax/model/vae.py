"""FLUX.1 `AutoencoderKL` and FLUX.2 `AutoencoderKLFlux2` in Flax NNX, NHWC.

Encoder: conv_in -> levels of ResNet blocks (each but the last ends in a stride-2 downsample) -> mid block (ResNet,
single-head attention over H*W, ResNet) -> GroupNorm, SiLU, conv_out (2 x latent channels: mean and log-variance).
Decoder: conv_in -> mid block -> levels in reverse, each with one ResNet more, nearest x2 upsample but the last ->
GroupNorm, SiLU, conv_out. FLUX.2 adds 1x1 quant / post-quant convs, and its latents are normalised by BatchNorm
statistics after a 2x2 patchify, where FLUX.1 uses a scale and a shift.

`encode_tokens` / `decode_tokens` go between pixels in [-1, 1] and the packed, normalised tokens the MMDiT reads.
Norm statistics and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  family: str                                   # "flux1" or "flux2"
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_attention: bool = True
  scaling_factor: float = 0.3611                # FLUX.1 only
  shift_factor: float = 0.1159                  # FLUX.1 only
  batch_norm_eps: float = 1e-4                  # FLUX.2 only

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if self.family not in ("flux1", "flux2"):
      raise ValueError(f"VAE family={self.family!r}; expected 'flux1' or 'flux2'")
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                       f"{self.norm_num_groups}")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def token_channels(self) -> int:
    """Channels of one packed token: 2x2 latent patch."""
    return 4 * self.latent_channels

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(d) - fields or "family" not in d:
      raise ValueError(f"VAEConfig dict: unknown keys {sorted(set(d) - fields)}, or no family")
    return cls(**d)

  @classmethod
  def from_diffusers(cls, d: dict[str, Any]) -> "VAEConfig":
    """From a diffusers `AutoencoderKL` / `AutoencoderKLFlux2` config.json dict."""
    name = d.get("_class_name", "AutoencoderKLFlux2" if "batch_norm_eps" in d else "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderKLFlux2"):
      raise ValueError(f"VAE config has _class_name={name!r}; expected AutoencoderKL or AutoencoderKLFlux2")
    flux2 = name == "AutoencoderKLFlux2"
    blocks = len(d.get("block_out_channels", (128, 256, 512, 512)))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      if any(t != kind for t in d.get(key, [kind] * blocks)):
        raise ValueError(f"VAE {key}={d[key]}: only {kind} is supported")
    symmetric = d.get("decoder_block_out_channels") in (None, d.get("block_out_channels"))
    if d.get("act_fn", "silu") != "silu" or not symmetric:
      raise ValueError("VAE config: only act_fn='silu' and symmetric encoder/decoder channels are supported")
    return cls(
        family="flux2" if flux2 else "flux1",
        block_out_channels=tuple(d.get("block_out_channels", (128, 256, 512, 512))),
        layers_per_block=d.get("layers_per_block", 2),
        latent_channels=d.get("latent_channels", 32 if flux2 else 4),
        norm_num_groups=d.get("norm_num_groups", 32),
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        mid_attention=bool(d.get("mid_block_add_attention", True)),
        scaling_factor=float(d.get("scaling_factor") or 1.0), shift_factor=float(d.get("shift_factor") or 0.0),
        batch_norm_eps=float(d.get("batch_norm_eps", 1e-4)))


VAE_PRESETS = {
    "flux1": VAEConfig(family="flux1", latent_channels=16),
    "flux2": VAEConfig(family="flux2", latent_channels=32, use_quant_conv=True, use_post_quant_conv=True,
                       scaling_factor=1.0, shift_factor=0.0),
}


class GroupNorm(nnx.Module):
  def __init__(self, channels: int, groups: int, *, param_dtype, eps: float = 1e-6):
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x):
    B, H, W, C = x.shape
    g = x.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _conv(cin, cout, k, *, rngs, dtype, param_dtype, stride=1, padding="SAME"):
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  def __init__(self, cin, cout, groups, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(cin, groups, param_dtype=param_dtype)
    self.conv1 = _conv(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(cout, groups, param_dtype=param_dtype)
    self.conv2 = _conv(cout, cout, 3, **kw)
    self.shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.shortcut is None else self.shortcut(x)) + h


class Downsample(nnx.Module):
  """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

  def __init__(self, c, *, rngs, dtype, param_dtype):
    self.conv = _conv(c, c, 3, stride=2, padding="VALID", rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, c, *, rngs, dtype, param_dtype):
    self.conv = _conv(c, c, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Attention(nnx.Module):
  """Single-head self-attention over the H*W positions, with a residual connection."""

  def __init__(self, c, groups, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(c, groups, param_dtype=param_dtype)
    self.q, self.k, self.v, self.proj = (nnx.Linear(c, c, **kw) for _ in range(4))

  def __call__(self, x):
    B, H, W, C = x.shape
    h = self.norm(x).reshape(B, H * W, 1, C)
    a = jax.nn.dot_product_attention(self.q(h), self.k(h), self.v(h))
    return x + self.proj(a.reshape(B, H, W, C))


class MidBlock(nnx.Module):
  def __init__(self, c, groups, attention: bool, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.block_1 = ResnetBlock(c, c, groups, **kw)
    self.attn = Attention(c, groups, **kw) if attention else None
    self.block_2 = ResnetBlock(c, c, groups, **kw)

  def __call__(self, x):
    x = self.block_1(x)
    return self.block_2(x if self.attn is None else self.attn(x))


class Level(nnx.Module):
  """ResNet blocks, then an optional resampler (down- or upsample)."""

  def __init__(self, channels: list[tuple[int, int]], groups, resample, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.blocks = nnx.List([ResnetBlock(cin, cout, groups, **kw) for cin, cout in channels])
    self.resample = None if resample is None else resample(channels[-1][1], **kw)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x if self.resample is None else self.resample(x)


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
    self.conv_in = _conv(cfg.in_channels, ch[0], 3, **kw)
    levels, cin = [], ch[0]
    for i, cout in enumerate(ch):
      levels.append(Level([(cin, cout)] + [(cout, cout)] * (n - 1), g,
                          Downsample if i < len(ch) - 1 else None, **kw))
      cin = cout
    self.down = nnx.List(levels)
    self.mid = MidBlock(ch[-1], g, cfg.mid_attention, **kw)
    self.norm_out = GroupNorm(ch[-1], g, param_dtype=param_dtype)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.norm_out(self.mid(x))))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block
    self.conv_in = _conv(cfg.latent_channels, ch[0], 3, **kw)
    self.mid = MidBlock(ch[0], g, cfg.mid_attention, **kw)
    levels, cin = [], ch[0]
    for i, cout in enumerate(ch):   # levels in decoding order (diffusers' up_blocks; BFL's up reversed)
      levels.append(Level([(cin, cout)] + [(cout, cout)] * n, g, Upsample if i < len(ch) - 1 else None, **kw))
      cin = cout
    self.up = nnx.List(levels)
    self.norm_out = GroupNorm(ch[-1], g, param_dtype=param_dtype)
    self.conv_out = _conv(ch[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid(self.conv_in(z))
    for level in self.up:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
  """Both FLUX VAEs. `encode` gives the latent mean (B, H/8, W/8, C); `decode` the image (B, H, W, 3).

  FLUX.2's BatchNorm statistics are `nnx.BatchStat`s over the 4 C channels of the 2x2-patchified latent.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    cfg = self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    c = cfg.latent_channels
    self.quant_conv = _conv(2 * c, 2 * c, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(c, c, 1, **kw) if cfg.use_post_quant_conv else None
    if cfg.family == "flux2":
      self.bn_mean = nnx.BatchStat(jnp.zeros((4 * c,), jnp.float32))
      self.bn_var = nnx.BatchStat(jnp.ones((4 * c,), jnp.float32))

  def encode(self, x: jax.Array) -> jax.Array:
    """Pixels (B, H, W, 3) in [-1, 1] -> latent mean (B, H/8, W/8, C), the posterior's mode."""
    m = self.encoder(x)
    if self.quant_conv is not None:
      m = self.quant_conv(m)
    return m[..., :self.config.latent_channels]

  def decode(self, z: jax.Array) -> jax.Array:
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)


def pack(z: jax.Array) -> jax.Array:
  """(B, h, w, C) -> (B, (h/2)(w/2), 4C) tokens, row-major, channel c * 4 + py * 2 + px (FLUX packing)."""
  B, h, w, C = z.shape
  z = z.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
  return z.reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `pack`: (B, (h/2)(w/2), 4C) -> (B, h, w, C)."""
  B, _, C4 = tokens.shape
  z = tokens.reshape(B, h // 2, w // 2, C4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return z.reshape(B, h, w, C4 // 4)


def _latent_stats(vae: AutoencoderKL) -> tuple[jax.Array, jax.Array]:
  """FLUX.2's BatchNorm statistics, kept per packed channel (c * 4 + py * 2 + px), laid out as (2, 1, 2, C): the
  sub-position (py, px) of a latent inside its 2x2 token, so latents normalise without being packed."""
  C = vae.config.latent_channels
  to_grid = lambda a: a.reshape(C, 2, 2).transpose(1, 2, 0)[:, None, :, :]
  return to_grid(vae.bn_mean[...]), to_grid(jnp.sqrt(vae.bn_var[...] + vae.config.batch_norm_eps))


def _per_token_position(z: jax.Array, f) -> jax.Array:
  """Applies `f(z6)` to z (B, h, w, C) viewed as (B, h/2, 2, w/2, 2, C) (the 2x2 position inside a token)."""
  B, h, w, C = z.shape
  return f(z.reshape(B, h // 2, 2, w // 2, 2, C)).reshape(B, h, w, C)


def encode_latents(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1], H and W multiples of 16 -> normalised latents (B, H/8, W/8, C), unpacked."""
  cfg = vae.config
  z = vae.encode(images).astype(jnp.float32)
  if cfg.family == "flux1":
    return (z - cfg.shift_factor) * cfg.scaling_factor
  mean, std = _latent_stats(vae)
  return _per_token_position(z, lambda z6: (z6 - mean) / std)


def encode_tokens(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1], H and W multiples of 16 -> normalised packed tokens (B, H W / 256, 4C)."""
  return pack(encode_latents(vae, images))


def decode_tokens(vae: AutoencoderKL, tokens: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of `encode_tokens`: tokens of an H x W image -> pixels (B, H, W, 3)."""
  cfg = vae.config
  f = cfg.downsample
  z = unpack(tokens.astype(jnp.float32), height // f, width // f)
  if cfg.family == "flux1":
    z = z / cfg.scaling_factor + cfg.shift_factor
  else:
    mean, std = _latent_stats(vae)
    z = _per_token_position(z, lambda z6: z6 * std + mean)
  return vae.decode(z)


def count_vae_params(cfg: VAEConfig) -> int:
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

