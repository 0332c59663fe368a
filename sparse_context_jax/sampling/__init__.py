"""Flow-matching schedules and the Euler sampler (the denoising loop compiled as one program)."""

from sparse_context_jax.sampling.euler import Conditioning, denoise
from sparse_context_jax.sampling.schedule import flux1_mu, flux2_mu, schedule_for, sigmas

__all__ = ["Conditioning", "denoise", "flux1_mu", "flux2_mu", "schedule_for", "sigmas"]
