"""Flax NNX text encoders of the FLUX pipelines: one decoder-only transformer (Qwen3 for FLUX.2 klein, Mistral for
FLUX.2 dev), the T5 encoder and the CLIP text model (FLUX.1)."""
