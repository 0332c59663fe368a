"""Image and text encoders behind one small protocol, used by `precompute`, training and generation.

- `base`: the protocols (`ImageEncoder`, `TextEncoder`), `PromptEmbeddings`, `Encoders` (what `precompute` runs)
  and the one pixel normalisation (`unit_range` / `to_uint8`).
- `vae`: the project's Flax VAE: pixels -> normalised latents -> FLUX tokens, and back.
- `pixels`: the local mode's stand-in image tokens (pooled pixels; invertible, so quality is measured in pixels).
- `hashed_text`: the local mode's stand-in caption embedding.
- `prompts`: real text prompts as diffusers' FLUX pipelines encode them (`load_prompt_encoder`,
  `random_prompt_encoder`); `recipes` holds each pipeline's tokenization and readout as data, `tiny_tokenizers`
  and `random_text` the offline tokenizers and small random encoders.
"""

from sparse_context_jax.encoders.base import (Encoders, ImageEncoder, PromptEmbeddings, TextEncoder, to_uint8,
                                              unit_range)
from sparse_context_jax.encoders.hashed_text import HashedText
from sparse_context_jax.encoders.pixels import PixelTokens

__all__ = ["Encoders", "HashedText", "ImageEncoder", "PixelTokens", "PromptEmbeddings", "TextEncoder", "to_uint8",
           "unit_range"]
