"""Latent batches -> model batches: training on real VAE latents (a `precompute` folder) instead of pixel tokens.

The folder holds each image's normalised latents unpacked, (h, w, C); here they are packed into FLUX tokens with
the project's one packing (`model.vae.pack`: 2x2 patches, (h/2 * w/2, 4C)), and the text arrays the folder's
encoders wrote are the model's text inputs.
"""

from __future__ import annotations

import numpy as np

from sparse_context_jax.model.vae import pack


def latent_tokens(latents: np.ndarray) -> np.ndarray:
  """(..., h, w, C) latents -> (..., h/2 * w/2, 4C) float32 FLUX tokens, raster order."""
  *lead, h, w, c = latents.shape
  tokens = np.asarray(pack(np.asarray(latents, np.float32).reshape(-1, h, w, c)))
  return tokens.reshape(*lead, *tokens.shape[1:])


def latent_grid(raw: dict) -> tuple[int, int]:
  """(h, w) in tokens of a latent batch's target (and of its references, one bucket)."""
  h, w = raw["target_latent"].shape[1:3]
  return h // 2, w // 2


def latent_batch(raw: dict, cfg) -> dict:
  """A `make_latent_pipeline` batch -> this process's model batch (numpy; see `objective.loss_sums`):
  target (B, N, 4C), refs (B, R, N, 4C), ref_valid (B, R), txt (B, T, D) from `text_embeddings`, y (B, P) from
  `text_pooled` when the model has a pooled input, weight (B,) 1 on real examples and 0 on padding."""
  batch = {"target": latent_tokens(raw["target_latent"]), "refs": latent_tokens(raw["reference_latents"]),
           "ref_valid": raw["ref_valid"], "txt": np.asarray(raw["text_embeddings"], np.float32),
           "weight": raw["valid"].astype(np.float32)}
  if cfg.pooled_dim:
    batch["y"] = np.asarray(raw["text_pooled"], np.float32)
  return batch
