"""Which checkpoint is this: kind (transformer or VAE), layout (BFL or diffusers), family and sizes, from config.json
or names and shapes.

The transformer's detection keys follow diffusers' checkpoint-type detection: a shared single-stream modulation
marks FLUX.2, a guidance embedder is present or absent. Sizes come from the shapes of a few probe tensors; what
shapes cannot tell (RoPE axes, theta) comes from the family's released value. A VAE has encoder/decoder input
convolutions; its levels, channels and quant convolutions are read from the shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.vae import VAEConfig

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
_VAE_LAYOUT_PROBES = {"bfl": "encoder.down.0.block.0.conv1.weight",
                      "diffusers": "encoder.down_blocks.0.resnets.0.conv1.weight"}


def is_vae(keys, folder_config: Mapping | None) -> bool:
  if folder_config is not None and str(folder_config.get("_class_name", "")).startswith("Autoencoder"):
    return True
  return any(k in set(keys) for k in _VAE_KEYS)


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
    if "family" in d:   # this project's own config.json (with or without its "kind")
      return MMDiTConfig.from_dict({k: v for k, v in d.items() if k != "kind"})
    return MMDiTConfig.from_diffusers(d)
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{what}: {e}") from None

def _read_config_file(config_path: str) -> dict:
  try:
    return json.loads(Path(config_path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read --config {config_path}: {e}") from None


def resolve_config(shapes: Mapping[str, tuple[int, ...]], layout: str, what: str, folder_config: dict | None,
                   config_path: str | None) -> MMDiTConfig:
  """--config, else the folder's config.json, else inferred from names and shapes."""
  if config_path is not None:
    return config_from_json(_read_config_file(config_path), f"--config {config_path}")
  if folder_config is not None:
    return config_from_json(folder_config, f"{what}/config.json")
  return infer_config(shapes, layout, what)


# ---- VAEs -----------------------------------------------------------------------------------------------------------
def detect_vae_layout(keys, what: str) -> str:
  found = [layout for layout, probe in _VAE_LAYOUT_PROBES.items() if probe in set(keys)]
  if len(found) != 1:
    raise CheckpointError(f"{what} looks like a VAE but has neither {_VAE_LAYOUT_PROBES['bfl']} (BFL) nor "
                          f"{_VAE_LAYOUT_PROBES['diffusers']} (diffusers)" if not found else
                          f"{what} mixes BFL and diffusers VAE key names")
  return found[0]


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], layout: str, what: str) -> VAEConfig:
  """A released-style VAE from names and shapes (norm groups 32; FLUX.1 scale and shift)."""
  level = (lambda i: f"encoder.down.{i}.block") if layout == "bfl" else (lambda i: f"encoder.down_blocks.{i}.resnets")
  channels, i = [], 0
  while f"{level(i)}.0.conv1.weight" in shapes:
    channels.append(shapes[f"{level(i)}.0.conv1.weight"][0])
    i += 1
  layers = sum(1 for k in shapes if k.startswith(f"{level(0)}.") and k.endswith(".conv1.weight"))
  if not channels or "decoder.conv_in.weight" not in shapes:
    raise CheckpointError(f"{what}: cannot infer the VAE architecture; pass --config (a diffusers VAE config.json)")
  flux2 = "bn.running_mean" in shapes
  quant = ("encoder.quant_conv.weight" if layout == "bfl" else "quant_conv.weight") in shapes
  post = ("decoder.post_quant_conv.weight" if layout == "bfl" else "post_quant_conv.weight") in shapes
  base = dict(family="flux2" if flux2 else "flux1", block_out_channels=tuple(channels), layers_per_block=layers,
              latent_channels=shapes["decoder.conv_in.weight"][1], use_quant_conv=quant, use_post_quant_conv=post)
  if flux2:
    base.update(scaling_factor=1.0, shift_factor=0.0)
  try:
    return VAEConfig(**base)
  except ValueError as e:
    raise CheckpointError(f"{what}: no released-style VAE fits its names and shapes ({e}); pass --config") from None


def resolve_vae_config(shapes: Mapping[str, tuple[int, ...]], layout: str, what: str, folder_config: dict | None,
                       config_path: str | None) -> VAEConfig:
  """--config, else the folder's config.json (diffusers' or this project's), else inferred from names and shapes."""
  d = folder_config
  if config_path is not None:
    d = _read_config_file(config_path)
  if d is None:
    return infer_vae_config(shapes, layout, what)
  try:
    return VAEConfig.from_dict({k: v for k, v in d.items() if k != "kind"}) if d.get("kind") == "vae" \
        else VAEConfig.from_diffusers(d)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{what}: VAE config: {e}") from None
