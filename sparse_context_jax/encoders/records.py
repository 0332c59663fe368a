"""What a training run records of its encoders (`RUN_DIR/encoders.json`), and the encoders built again from it, so
`generate --model RUN_DIR` encodes and decodes with the ones the run trained with.

    {"image": {"kind": "pixel-tokens", "channels": 12}                         # the local mode's stand-ins
              | {"kind": "vae", "path": "/abs/converted/vae"}                  # a precompute folder's VAE
              | {"kind": "unknown", "name": "..."},                            # encoders it cannot name
     "text":  {"kind": "hashed-text", "length": 32, "dim": 16, "pooled_dim": 0}
              | {"kind": "text-encoder", "paths": ["/abs/..."], "max_sequence_length": 512}
              | {"kind": "unknown", "name": "..."}}

Each side is the `record` of its encoder (`PixelTokens.record`, `HashedText.record`, `Encoders.record` of
`precompute`'s VAE and text encoders).
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_context_jax.encoders.base import ImageEncoder
from sparse_context_jax.encoders.hashed_text import HashedText
from sparse_context_jax.encoders.pixels import PixelTokens

IMAGE_KINDS, TEXT_KINDS = ("pixel-tokens", "vae"), ("hashed-text", "text-encoder")


def unknown(name: str) -> dict:
  """The record of an encoder that cannot be named for rebuilding (only its name is kept)."""
  return {"kind": "unknown", "name": name}


def image_encoder(record: dict, *, dtype=jnp.float32) -> ImageEncoder:
  """The image encoder of a run's record; ValueError (naming it) when the record cannot be rebuilt."""
  kind = record.get("kind")
  if kind == "pixel-tokens":
    return PixelTokens(int(record["channels"]))
  if kind == "vae":
    from sparse_context_jax.convert.checkpoint import load_vae
    from sparse_context_jax.encoders.vae import VAEImageEncoder
    return VAEImageEncoder(load_vae(record["path"], dtype=dtype))
  raise ValueError(f"image encoder {record.get('name', kind)!r} cannot be rebuilt from the run's record (expected "
                   f"one of {IMAGE_KINDS})")


def text_encoder(record: dict, *, dtype=jnp.float32):
  """The text encoder of a run's record: called as `enc(prompts, max_sequence_length=N)` -> `PromptEmbeddings`;
  ValueError (naming it) when the record cannot be rebuilt."""
  kind = record.get("kind")
  if kind == "hashed-text":
    return HashedText(int(record["length"]), int(record["dim"]), int(record["pooled_dim"]))
  if kind == "text-encoder":
    from sparse_context_jax.encoders.prompts import load_prompt_encoder
    return load_prompt_encoder(*record["paths"], dtype=dtype)
  raise ValueError(f"text encoder {record.get('name', kind)!r} cannot be rebuilt from the run's record (expected "
                   f"one of {TEXT_KINDS})")
