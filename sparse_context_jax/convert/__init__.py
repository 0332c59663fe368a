"""Weight conversion between PyTorch FLUX checkpoints and this project's parameters."""

from sparse_context_jax.convert.checkpoint import load_model
from sparse_context_jax.convert.vae_convert import load_vae
from sparse_context_jax.convert.state_dict import (CheckpointError, ModelSpec, load_state_dict, model_params,
                                                   params_from_state_dict, set_model_params, state_dict_from_params)
from sparse_context_jax.convert.streaming import convert_checkpoint, export_checkpoint
from sparse_context_jax.convert.tables import LAYOUTS, rules_for

__all__ = ["CheckpointError", "LAYOUTS", "ModelSpec", "convert_checkpoint", "export_checkpoint", "load_model", "load_vae",
           "load_state_dict", "model_params", "params_from_state_dict", "rules_for", "set_model_params",
           "state_dict_from_params"]
