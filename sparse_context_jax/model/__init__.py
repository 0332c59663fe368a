"""The FLUX-family MMDiT in Flax NNX."""

from sparse_context_jax.model.config import PRESETS, MMDiTConfig, preset
from sparse_context_jax.model.mmdit import MMDiT, count_params

__all__ = ["MMDiT", "MMDiTConfig", "PRESETS", "count_params", "preset"]
