"""Which checkpoint is this: layout (BFL or diffusers), family and sizes, from config.json or names and shapes.

The detection keys follow diffusers' checkpoint-type detection (flux_arch.md section 3.2): a shared single-stream
modulation marks FLUX.2, a guidance embedder is present or absent. Sizes come from the shapes of a few probe
tensors; what shapes cannot tell (RoPE axes, theta) comes from the family's released value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from sparse_context_jax.convert.state_dict import CheckpointError
from sparse_context_jax.model.config import MMDiTConfig

# role -> candidate keys per layout (the first present one is used).
_PROBES: dict[str, dict[str, tuple[str, ...]]] = {
    "bfl": dict(
        img_in=("img_in.weight",), txt_in=("txt_in.weight",), final=("final_layer.linear.weight",),
        time=("time_in.in_layer.weight",), guidance=("guidance_in.in_layer.weight",),
        pooled=("vector_in.in_layer.weight",), qk_norm=("double_blocks.0.img_attn.norm.query_norm.scale",),
        mlp_in=("double_blocks.0.img_mlp.0.weight",), flux2=("single_stream_modulation.lin.weight",)),
    "diffusers": dict(
        img_in=("x_embedder.weight",), txt_in=("context_embedder.weight",), final=("proj_out.weight",),
        time=("time_text_embed.timestep_embedder.linear_1.weight",
              "time_guidance_embed.timestep_embedder.linear_1.weight"),
        guidance=("time_text_embed.guidance_embedder.linear_1.weight",
                  "time_guidance_embed.guidance_embedder.linear_1.weight"),
        pooled=("time_text_embed.text_embedder.linear_1.weight",), qk_norm=("transformer_blocks.0.attn.norm_q.weight",),
        mlp_in=("transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.ff.linear_in.weight"),
        flux2=("single_stream_modulation.linear.weight",)),
}
_BLOCKS = {"bfl": ("double_blocks.", "single_blocks."),
           "diffusers": ("transformer_blocks.", "single_transformer_blocks.")}
# Released RoPE axes per family (head dim 128); other head dims need --config.
_AXES = {"flux1": (16, 56, 56), "flux2": (32, 32, 32, 32)}
_VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight")

def detect_layout(keys: list[str], what: str) -> str:
  """'bfl' or 'diffusers'; a VAE or any other model is a `CheckpointError` naming what was found."""
  present = set(keys)
  found = [layout for layout, probes in _PROBES.items() if probes["img_in"][0] in present]
  if len(found) == 1:
    return found[0]
  if any(k in present for k in _VAE_KEYS):
    raise CheckpointError(f"{what} is a VAE (it has {', '.join(k for k in _VAE_KEYS if k in present)}), not a FLUX "
                          "transformer; only transformers can be converted")
  if found:
    raise CheckpointError(f"{what} mixes BFL and diffusers key names (both img_in.weight and x_embedder.weight)")
  sample = ", ".join(sorted(keys)[:4]) + (", ..." if len(keys) > 4 else "")
  raise CheckpointError(f"{what} is not a FLUX transformer: neither img_in.weight (BFL) nor x_embedder.weight "
                        f"(diffusers) among its {len(keys)} tensor(s) ({sample})")

def infer_config(shapes: Mapping[str, tuple[int, ...]], layout: str, what: str) -> MMDiTConfig:
  """The architecture of a `layout` checkpoint from tensor names and shapes alone."""
  probes = _PROBES[layout]

  def probe(role: str, required: bool = True) -> tuple[int, ...] | None:
    for key in probes[role]:
      if key in shapes:
        return shapes[key]
    if required:
      raise CheckpointError(f"{what}: cannot infer the architecture without {probes[role][0]}; pass --config")
    return None

  def depth(prefix: str) -> int:
    layers = {int(k[len(prefix):].split(".")[0]) for k in shapes
              if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(layers) + 1 if layers else 0

  flux2 = probe("flux2", required=False) is not None
  (D, in_channels), (_, context), (out_channels, _) = probe("img_in"), probe("txt_in"), probe("final")
  (head_dim,), (mlp_in, _) = probe("qk_norm"), probe("mlp_in")
  family = "flux2" if flux2 else "flux1"
  if head_dim != 128 or D % head_dim:
    raise CheckpointError(f"{what}: head dim {head_dim} with hidden size {D} is not a released FLUX architecture, "
                          "so the RoPE axes cannot be inferred; pass --config")
  d = dict(in_channels=in_channels, out_channels=out_channels, num_layers=depth(_BLOCKS[layout][0]),
           num_single_layers=depth(_BLOCKS[layout][1]), attention_head_dim=head_dim, num_attention_heads=D // head_dim,
           joint_attention_dim=context, guidance_embeds=probe("guidance", required=False) is not None,
           axes_dims_rope=_AXES[family])
  if flux2:
    d.update(_class_name="Flux2Transformer2DModel", mlp_ratio=mlp_in / 2 / D,
             timestep_guidance_channels=probe("time")[1])
  else:
    d.update(_class_name="FluxTransformer2DModel", pooled_projection_dim=probe("pooled")[1])
  return MMDiTConfig.from_diffusers(d)

def config_from_json(d: dict, what: str) -> MMDiTConfig:
  """A diffusers transformer config.json dict, or this project's own `MMDiTConfig.to_json` dict."""
  cls = d.get("_class_name", "")
  if cls.startswith("Autoencoder"):
    raise CheckpointError(f"{what} is the config of a VAE ({cls}), not of a FLUX transformer")
  try:
    return MMDiTConfig.from_dict(d) if "family" in d else MMDiTConfig.from_diffusers(d)
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{what}: {e}") from None

def resolve_config(shapes: Mapping[str, tuple[int, ...]], layout: str, what: str, folder_config: dict | None,
                   config_path: str | None) -> MMDiTConfig:
  """--config, else the folder's config.json, else inferred from names and shapes."""
  if config_path is not None:
    try:
      d = json.loads(Path(config_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"cannot read --config {config_path}: {e}") from None
    return config_from_json(d, f"--config {config_path}")
  if folder_config is not None:
    return config_from_json(folder_config, f"{what}/config.json")
  return infer_config(shapes, layout, what)
