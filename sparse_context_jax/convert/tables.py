"""Weight-key tables of the transformer: torch checkpoint layouts (diffusers, Black Forest Labs) <-> this project's
parameters. One table per family and layout, built from the config (sizes are never literals).
"""

from __future__ import annotations

from sparse_context_jax.convert.rules import TensorRule, LinearRule, Rule
from sparse_context_jax.model.config import MMDiTConfig

def transformer_rules(cfg: MMDiTConfig, layout: str) -> list[Rule]:
  return _diffusers(cfg) if layout == "diffusers" else _bfl(cfg)


def _lin(sources, rows, targets, **kw) -> LinearRule:
  as_tuple = lambda x: (x,) if isinstance(x, (str, int)) else tuple(x)
  return LinearRule(as_tuple(sources), as_tuple(rows), as_tuple(targets), **kw)


def _diffusers(cfg: MMDiTConfig) -> list[Rule]:
  D, mlp_in, Ld, Ls = cfg.hidden_size, cfg.mlp_in_features, cfg.depth_double, cfg.depth_single
  flux1 = cfg.family == "flux1"
  emb = "time_text_embed" if flux1 else "time_guidance_embed"
  r: list[Rule] = [
      _lin("x_embedder", D, "img_in"),
      _lin("context_embedder", D, "txt_in"),
      _lin(f"{emb}.timestep_embedder.linear_1", D, "time_in.in_layer"),
      _lin(f"{emb}.timestep_embedder.linear_2", D, "time_in.out_layer"),
      _lin("norm_out.linear", 2 * D, "final_layer.adaLN", swap_halves=True),
      _lin("proj_out", cfg.out_channels, "final_layer.linear"),
  ]
  if cfg.guidance_embed:
    r += [_lin(f"{emb}.guidance_embedder.linear_1", D, "guidance_in.in_layer"),
          _lin(f"{emb}.guidance_embedder.linear_2", D, "guidance_in.out_layer")]
  if cfg.pooled_dim:
    r += [_lin(f"{emb}.text_embedder.linear_1", D, "vector_in.in_layer"),
          _lin(f"{emb}.text_embedder.linear_2", D, "vector_in.out_layer")]
  if cfg.shared_modulation:
    r += [_lin("double_stream_modulation_img.linear", 6 * D, "double_mod_img.lin"),
          _lin("double_stream_modulation_txt.linear", 6 * D, "double_mod_txt.lin"),
          _lin("single_stream_modulation.linear", 3 * D, "single_mod.lin")]

  d, t = "transformer_blocks.{i}", "double_blocks"
  mlp_names = ("net.0.proj", "net.2") if flux1 else ("linear_in", "linear_out")
  r += [
      _lin([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], [D] * 3, f"{t}.img_attn.qkv", layers=Ld),
      _lin([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], [D] * 3, f"{t}.txt_attn.qkv",
           layers=Ld),
      TensorRule(f"{d}.attn.norm_q.weight", f"{t}.img_attn.query_norm.scale", layers=Ld),
      TensorRule(f"{d}.attn.norm_k.weight", f"{t}.img_attn.key_norm.scale", layers=Ld),
      TensorRule(f"{d}.attn.norm_added_q.weight", f"{t}.txt_attn.query_norm.scale", layers=Ld),
      TensorRule(f"{d}.attn.norm_added_k.weight", f"{t}.txt_attn.key_norm.scale", layers=Ld),
      _lin(f"{d}.attn.to_out.0", D, f"{t}.img_proj", layers=Ld),
      _lin(f"{d}.attn.to_add_out", D, f"{t}.txt_proj", layers=Ld),
      _lin(f"{d}.ff.{mlp_names[0]}", mlp_in, f"{t}.img_mlp.fc1", layers=Ld),
      _lin(f"{d}.ff.{mlp_names[1]}", D, f"{t}.img_mlp.fc2", layers=Ld),
      _lin(f"{d}.ff_context.{mlp_names[0]}", mlp_in, f"{t}.txt_mlp.fc1", layers=Ld),
      _lin(f"{d}.ff_context.{mlp_names[1]}", D, f"{t}.txt_mlp.fc2", layers=Ld),
  ]
  if not cfg.shared_modulation:
    r += [_lin(f"{d}.norm1.linear", 6 * D, f"{t}.img_mod.lin", layers=Ld),
          _lin(f"{d}.norm1_context.linear", 6 * D, f"{t}.txt_mod.lin", layers=Ld)]

  s, t = "single_transformer_blocks.{i}", "single_blocks"
  if flux1:
    r += [_lin([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"], [D, D, D, mlp_in],
               [f"{t}.attn.qkv", f"{t}.mlp.fc1"], layers=Ls),
          _lin(f"{s}.proj_out", D, [f"{t}.proj", f"{t}.mlp.fc2"], split="in", layers=Ls),
          _lin(f"{s}.norm.linear", 3 * D, f"{t}.modulation.lin", layers=Ls)]
  else:
    r += [_lin(f"{s}.attn.to_qkv_mlp_proj", 3 * D + mlp_in, [f"{t}.attn.qkv", f"{t}.mlp.fc1"], layers=Ls),
          _lin(f"{s}.attn.to_out", D, [f"{t}.proj", f"{t}.mlp.fc2"], split="in", layers=Ls)]
  r += [TensorRule(f"{s}.attn.norm_q.weight", f"{t}.attn.query_norm.scale", layers=Ls),
        TensorRule(f"{s}.attn.norm_k.weight", f"{t}.attn.key_norm.scale", layers=Ls)]
  return r


def _bfl(cfg: MMDiTConfig) -> list[Rule]:
  D, mlp_in, Ld, Ls = cfg.hidden_size, cfg.mlp_in_features, cfg.depth_double, cfg.depth_single
  r: list[Rule] = [
      _lin("img_in", D, "img_in"),
      _lin("txt_in", D, "txt_in"),
      _lin("time_in.in_layer", D, "time_in.in_layer"),
      _lin("time_in.out_layer", D, "time_in.out_layer"),
      _lin("final_layer.adaLN_modulation.1", 2 * D, "final_layer.adaLN"),
      _lin("final_layer.linear", cfg.out_channels, "final_layer.linear"),
  ]
  if cfg.guidance_embed:
    r += [_lin("guidance_in.in_layer", D, "guidance_in.in_layer"),
          _lin("guidance_in.out_layer", D, "guidance_in.out_layer")]
  if cfg.pooled_dim:
    r += [_lin("vector_in.in_layer", D, "vector_in.in_layer"),
          _lin("vector_in.out_layer", D, "vector_in.out_layer")]
  if cfg.shared_modulation:
    r += [_lin("double_stream_modulation_img.lin", 6 * D, "double_mod_img.lin"),
          _lin("double_stream_modulation_txt.lin", 6 * D, "double_mod_txt.lin"),
          _lin("single_stream_modulation.lin", 3 * D, "single_mod.lin")]

  d, t = "double_blocks.{i}", "double_blocks"
  for stream in ("img", "txt"):
    r += [
        _lin(f"{d}.{stream}_attn.qkv", 3 * D, f"{t}.{stream}_attn.qkv", layers=Ld),
        TensorRule(f"{d}.{stream}_attn.norm.query_norm.scale", f"{t}.{stream}_attn.query_norm.scale", layers=Ld),
        TensorRule(f"{d}.{stream}_attn.norm.key_norm.scale", f"{t}.{stream}_attn.key_norm.scale", layers=Ld),
        _lin(f"{d}.{stream}_attn.proj", D, f"{t}.{stream}_proj", layers=Ld),
        _lin(f"{d}.{stream}_mlp.0", mlp_in, f"{t}.{stream}_mlp.fc1", layers=Ld),
        _lin(f"{d}.{stream}_mlp.2", D, f"{t}.{stream}_mlp.fc2", layers=Ld),
    ]
    if not cfg.shared_modulation:
      r.append(_lin(f"{d}.{stream}_mod.lin", 6 * D, f"{t}.{stream}_mod.lin", layers=Ld))

  s, t = "single_blocks.{i}", "single_blocks"
  r += [
      _lin(f"{s}.linear1", 3 * D + mlp_in, [f"{t}.attn.qkv", f"{t}.mlp.fc1"], layers=Ls),
      _lin(f"{s}.linear2", D, [f"{t}.proj", f"{t}.mlp.fc2"], split="in", layers=Ls),
      TensorRule(f"{s}.norm.query_norm.scale", f"{t}.attn.query_norm.scale", layers=Ls),
      TensorRule(f"{s}.norm.key_norm.scale", f"{t}.attn.key_norm.scale", layers=Ls),
  ]
  if not cfg.shared_modulation:
    r.append(_lin(f"{s}.modulation.lin", 3 * D, f"{t}.modulation.lin", layers=Ls))
  return r
