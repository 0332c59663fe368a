"""The project's Flax VAE as an image encoder: pixels -> normalised latents -> FLUX tokens, and tokens -> pixels.

Every call runs through a compiled program (`ModuleProgram`: the VAE's state is an argument, so new images of a
seen shape never recompile). `latents` is the side `precompute` stores (unpacked; training packs them once).
"""

from __future__ import annotations

import jax
import numpy as np

from sparse_context_jax.encoders.base import Encoders, TextEncoder, prompt_arrays
from sparse_context_jax.model.vae import AutoencoderKL, decode_tokens, encode_latents, encode_tokens
from sparse_context_jax.programs import ModuleProgram


class VAEImageEncoder:
  """`encode(pixels)` (B, H, W, 3) in [-1, 1] -> tokens (B, H W / 256, 4C); `decode(tokens, (H, W))` -> pixels;
  `latents(pixels)` -> (B, H/8, W/8, C) normalised latents. Programs: `.programs` (their compile records)."""

  def __init__(self, vae: AutoencoderKL, name: str = "vae"):
    cfg = vae.config
    self.config, self.name, self.token_channels = cfg, name, cfg.token_channels
    self.token_pixels = cfg.downsample * 2   # latents are packed 2x2 into tokens
    self._encode = ModuleProgram(vae, encode_tokens, "encode")
    self._latents = ModuleProgram(vae, encode_latents, "latents")
    self._decode = ModuleProgram(vae, lambda m, t, *, h, w: decode_tokens(m, t, h, w), "decode")
    self.state = self._encode.state

  def place(self, sharding) -> None:
    """Puts the VAE's state on `sharding` (e.g. replicated over a mesh) for every program."""
    self.state = jax.device_put(self.state, sharding)

  @property
  def programs(self):
    return [p.programs for p in (self._encode, self._latents, self._decode)]

  def encode(self, pixels):
    return self._encode(pixels, state=self.state)

  def latents(self, pixels):
    return self._latents(pixels, state=self.state)

  def decode(self, tokens, size: tuple[int, int]):
    return self._decode(tokens, state=self.state, h=int(size[0]), w=int(size[1]))


def pow2(n: int) -> int:
  """The smallest power of two >= n (1 for 0)."""
  return 1 << max(0, n - 1).bit_length()


def precompute_encoders(image: VAEImageEncoder, text: TextEncoder, record: dict | None = None) -> Encoders:
  """`Encoders` for `precompute`: the VAE's normalised latents and the text encoder's arrays; `record` names them
  for the runs trained on the output (`Encoders.record`)."""

  def encode_images(images):
    # precompute passes the valid references only, a varying count: pad it to a power of two, so a bucket traces
    # a few programs, not one per count.
    n = len(images)
    padded = np.concatenate([images, np.zeros((pow2(n) - n, *images.shape[1:]), images.dtype)])
    return np.asarray(image.latents(padded), np.float32)[:n]

  return Encoders(f"{image.name}+{text.name}", encode_images, lambda captions: prompt_arrays(text(captions)),
                  record)
