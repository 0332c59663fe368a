"""Weight conversion between PyTorch checkpoints (FLUX transformers, VAEs, text encoders) and this project's modules.

One mechanism for every kind of model (`kinds.KINDS`): declarative rules (`rules`, `tables`, `vae_tables`,
`text_tables`), streamed conversion and export (`streaming`), and one loader, `load(path)`, that builds what a
converted folder holds. A diffusers pipeline folder converts component by component (`pipeline`);
`pipeline_components(OUT)` finds them again. A training run is one more source of weights (`run`: `read_run`,
`load_model(RUN_DIR)`, `export_checkpoint(RUN_DIR, ...)`).
"""

from sparse_context_jax.convert.checkpoint import load, load_model, load_text_encoder, load_vae, read_config, save
from sparse_context_jax.convert.kinds import KINDS, LAYOUTS, rules_for
from sparse_context_jax.convert.pipeline import PipelineReport, convert_pipeline, is_pipeline
from sparse_context_jax.convert.pipeline_index import is_converted_pipeline, pipeline_components
from sparse_context_jax.convert.run import is_run, open_run, read_run
from sparse_context_jax.convert.state_dict import (ModelSpec, load_state_dict, model_params, model_variables,
                                                   params_from_state_dict, set_model_params, state_dict_from_params)
from sparse_context_jax.convert.streaming import convert_checkpoint, export_checkpoint
from sparse_context_jax.errors import CheckpointError

__all__ = ["CheckpointError", "KINDS", "LAYOUTS", "ModelSpec", "PipelineReport", "convert_checkpoint",
           "convert_pipeline", "export_checkpoint", "is_converted_pipeline", "is_pipeline", "is_run",
           "load", "load_model", "load_state_dict", "load_text_encoder", "load_vae", "model_params",
           "model_variables", "open_run", "params_from_state_dict", "pipeline_components", "read_config",
           "read_run", "rules_for", "save", "set_model_params", "state_dict_from_params"]
