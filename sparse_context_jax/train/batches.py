"""Pipeline batches -> this process's model batches (numpy), the input of `objective.loss_sums`.

A model batch: target (B, N, C) clean target tokens; refs (B, R, N, C) clean reference tokens; ref_valid (B, R)
bool; txt (B, T, D); y (B, P) for models with a pooled input; weight (B,) 1 on real examples, 0 on padding. With it
comes the token grid (h, w) of the target and of every reference (the pipeline resizes them to one bucket).

- pixel batches (images and captions) go through the run's image and text encoders (`run_encoders`: the local
  mode's stand-ins, pixel tokens and hashed captions);
- latent batches (a `precompute` folder) hold normalised latents, packed here into tokens (the one packing of the
  project, `model.vae.pack`), and the text arrays the folder's encoders wrote.
"""

from __future__ import annotations

import numpy as np

from sparse_context_jax.encoders import HashedText, ImageEncoder, PixelTokens, TextEncoder, unit_range
from sparse_context_jax.encoders.records import unknown
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.positions import token_grid
from sparse_context_jax.model.vae import pack


def run_encoders(config, cfg: MMDiTConfig) -> tuple[ImageEncoder, TextEncoder]:
  """The image and text encoders of a run that reads pixels (`data.encoder = pixels`): the stand-ins."""
  return PixelTokens(cfg.in_channels), HashedText(config.data.txt_len, cfg.context_dim, cfg.pooled_dim)


def run_encoder_record(config, cfg: MMDiTConfig) -> dict:
  """What the run records of its encoders (`encoders/records.py`): the stand-ins of a pixel run, or the record of
  the precompute folder's encoders (its VAE folder and text encoders) of a latent run."""
  if config.data.encoder == "latents":
    from sparse_context_jax.data.precompute import Latents
    info = Latents(config.data.path).info
    return info.get("encoder_record") or {"image": unknown(info["encoders"]), "text": unknown(info["encoders"])}
  image, text = run_encoders(config, cfg)
  return {"image": image.record, "text": text.record}


def pixel_batch(raw: dict, cfg: MMDiTConfig, image: ImageEncoder, text: TextEncoder) -> tuple[dict, tuple[int, int]]:
  """A `make_pipeline` batch (uint8 pixels, captions) -> (model batch, token grid)."""
  emb = text([str(c) for c in raw["caption"]])
  batch = {"target": np.asarray(image.encode(unit_range(raw["target"])), np.float32),
           "refs": np.asarray(image.encode(unit_range(raw["references"])), np.float32),
           "ref_valid": raw["ref_valid"], "txt": np.asarray(emb.txt, np.float32),
           "weight": raw["valid"].astype(np.float32)}
  if cfg.pooled_dim:
    batch["y"] = np.asarray(emb.y, np.float32)
  return batch, token_grid(raw["target"].shape[1:3])


def latent_tokens(latents: np.ndarray) -> np.ndarray:
  """(..., h, w, C) latents -> (..., h/2 * w/2, 4C) float32 FLUX tokens, raster order."""
  *lead, h, w, c = latents.shape
  tokens = np.asarray(pack(np.asarray(latents, np.float32).reshape(-1, h, w, c)))
  return tokens.reshape(*lead, *tokens.shape[1:])


def latent_batch(raw: dict, cfg: MMDiTConfig) -> tuple[dict, tuple[int, int]]:
  """A `make_latent_pipeline` batch -> (model batch, token grid): txt from `text_embeddings`, y from
  `text_pooled` when the model has a pooled input."""
  batch = {"target": latent_tokens(raw["target_latent"]), "refs": latent_tokens(raw["reference_latents"]),
           "ref_valid": raw["ref_valid"], "txt": np.asarray(raw["text_embeddings"], np.float32),
           "weight": raw["valid"].astype(np.float32)}
  if cfg.pooled_dim:
    batch["y"] = np.asarray(raw["text_pooled"], np.float32)
  h, w = raw["target_latent"].shape[1:3]
  return batch, (h // 2, w // 2)
