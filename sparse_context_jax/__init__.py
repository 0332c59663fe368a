"""sparse_context_jax: reference-conditioned FLUX generation with sparse reference tokens, in JAX/Flax."""

from sparse_context_jax.convert import load, load_model, load_text_encoder, load_vae, read_run
from sparse_context_jax.encoders.prompts import load_prompt_encoder
from sparse_context_jax.model import PRESETS, MMDiT, MMDiTConfig, count_params, preset

__all__ = ["MMDiT", "MMDiTConfig", "PRESETS", "count_params", "load", "load_model", "load_prompt_encoder",
           "load_text_encoder", "load_vae", "preset", "read_run"]
__version__ = "0.1.0"
