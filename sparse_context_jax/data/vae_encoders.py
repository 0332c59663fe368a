"""The project's Flax VAE as `precompute` encoders (`--encoders vae:PATH`, PATH a VAE folder written by `convert`).

The image side is the VAE's encoder (the posterior mean), normalised as the MMDiT reads it (`encode_tokens`) and
unpacked back to (h, w, C), so a latent folder holds exactly what training packs into tokens. Real text encoders
are still missing: the text side is the hashed stand-in caption embedding (`train/standin.py` `HashedText`),
written as `text_embeddings` (T, D) and, with a pooled dim, `text_pooled` (P,).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from sparse_context_jax.data.precompute import Encoders
from sparse_context_jax.model.vae import encode_tokens, unpack


def vae_encoders(path: str | os.PathLike, *, text_len: int, text_dim: int, pooled_dim: int = 0) -> Encoders:
  """Encoders of the converted VAE at `path` (float32) and the hashed stand-in text (text_len x text_dim, and a
  pooled_dim vector when > 0). ValueError if `path` is not a converted VAE."""
  from sparse_context_jax.convert import CheckpointError, load_vae
  from sparse_context_jax.train.standin import HashedText
  if text_len <= 0 or text_dim <= 0 or pooled_dim < 0:
    raise ValueError(f"stand-in text of length {text_len}, dim {text_dim}, pooled dim {pooled_dim} (expected > 0, "
                     "> 0 and >= 0: the model's context_dim and pooled_dim)")
  try:
    vae = load_vae(path)
  except CheckpointError as e:
    raise ValueError(f"encoders vae:{os.fspath(path)}: {e}") from None
  graph, state = nnx.split(vae)
  f = vae.config.downsample

  @jax.jit
  def latents(state, images):   # the state is an argument, not a constant: one trace per image shape
    _, H, W, _ = images.shape
    return unpack(encode_tokens(nnx.merge(graph, state), images), H // f, W // f)

  text = HashedText(text_len, text_dim, pooled_dim)

  def encode_text(captions):
    txt, y = text(captions)
    return {"embeddings": txt, **({"pooled": y} if pooled_dim else {})}

  def encode_images(images):
    # precompute passes the valid references only, a varying count: pad it to a power of two, so a bucket traces
    # a few programs, not one per count.
    n = len(images)
    padded = np.concatenate([images, np.zeros((pow2(n) - n, *images.shape[1:]), images.dtype)])
    return np.asarray(latents(state, padded), np.float32)[:n]

  name = f"vae:{os.path.basename(os.path.abspath(path))}+hashed-text-{text_len}x{text_dim}"
  return Encoders(name, encode_images, encode_text)


def pow2(n: int) -> int:
  """The smallest power of two >= n (1 for 0)."""
  return 1 << max(0, n - 1).bit_length()
