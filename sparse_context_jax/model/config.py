"""Architecture description of one FLUX-family MMDiT (FLUX.1 or FLUX.2).

One frozen dataclass covers both families; every difference between them is a field, so the model code has no
family branches, only feature switches (bias, shared modulation, MLP kind, pooled vector, guidance embedder, RoPE).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Family = Literal["flux1", "flux2"]
MlpKind = Literal["gelu", "swiglu"]
ReferenceAttention = Literal["joint", "kv"]


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Sizes and feature switches of a FLUX.1 / FLUX.2 transformer.

  Attributes:
    family: "flux1" or "flux2" (selects the weight-key tables of the converter; the forward pass reads only the
      switches below).
    in_channels: channels of one packed image token (64 for FLUX.1, 128 for FLUX.2).
    out_channels: channels of the prediction per token.
    num_heads, head_dim: attention heads; hidden size D = num_heads * head_dim.
    depth_double, depth_single: number of double-stream and single-stream blocks.
    context_dim: text-encoder feature size fed to `txt_in`.
    pooled_dim: pooled text vector size fed to `vector_in` (FLUX.1 CLIP), 0 for none (FLUX.2).
    mlp_ratio: MLP hidden size = int(D * mlp_ratio).
    mlp: "gelu" (Linear, GELU-tanh, Linear) or "swiglu" (Linear to 2 * hidden, silu(gate) * up, Linear).
    bias: whether every linear layer has a bias (FLUX.1) or none does (FLUX.2).
    shared_modulation: three modulation layers shared by all blocks (FLUX.2) instead of per-block ones (FLUX.1).
    guidance_embed: whether a guidance-scale embedder is added to the time embedding.
    axes_dims: RoPE dims per position axis (3 axes for FLUX.1, 4 for FLUX.2); they sum to head_dim.
    theta: RoPE base.
    eps: epsilon of the LayerNorms and the QK RMSNorms.
    time_channels: width of the sinusoidal timestep / guidance embedding.
    reference_attention: how the released pipeline samples with references: "joint" (every token attends to every
      token at every step) or "kv" (FLUX.2 klein KV: the references' K/V are extracted at the first step and reused,
      see `model.reference_kv`). The weights are the same; the call chooses (`kv_cache_mode`), this records the
      default of generation and training. diffusers' transformer config has no such field.
  """

  family: Family
  in_channels: int
  out_channels: int
  num_heads: int
  head_dim: int
  depth_double: int
  depth_single: int
  context_dim: int
  pooled_dim: int
  mlp_ratio: float
  mlp: MlpKind
  bias: bool
  shared_modulation: bool
  guidance_embed: bool
  axes_dims: tuple[int, ...]
  theta: float
  eps: float = 1e-6
  time_channels: int = 256
  reference_attention: ReferenceAttention = "joint"

  def __post_init__(self):
    object.__setattr__(self, "axes_dims", tuple(int(a) for a in self.axes_dims))
    problems = []
    if self.family not in ("flux1", "flux2"):
      problems.append(f"family={self.family!r} (expected 'flux1' or 'flux2')")
    if self.mlp not in ("gelu", "swiglu"):
      problems.append(f"mlp={self.mlp!r} (expected 'gelu' or 'swiglu')")
    if self.reference_attention not in ("joint", "kv"):
      problems.append(f"reference_attention={self.reference_attention!r} (expected 'joint' or 'kv')")
    elif self.reference_attention == "kv" and not self.shared_modulation:
      problems.append("reference_attention='kv' needs the shared modulation of FLUX.2 (shared_modulation=True)")
    for name in ("in_channels", "out_channels", "num_heads", "head_dim", "context_dim", "time_channels"):
      if int(getattr(self, name)) <= 0:
        problems.append(f"{name}={getattr(self, name)} (expected > 0)")
    for name in ("depth_double", "depth_single", "pooled_dim"):
      if int(getattr(self, name)) < 0:
        problems.append(f"{name}={getattr(self, name)} (expected >= 0)")
    if sum(self.axes_dims) != self.head_dim:
      problems.append(f"axes_dims={self.axes_dims} sum to {sum(self.axes_dims)}, expected head_dim={self.head_dim}")
    if any(a <= 0 or a % 2 for a in self.axes_dims):
      problems.append(f"axes_dims={self.axes_dims} (every axis dim must be even and > 0)")
    if self.time_channels % 2:
      problems.append(f"time_channels={self.time_channels} (must be even)")
    if self.mlp_ratio <= 0 or self.mlp_hidden <= 0:
      problems.append(f"mlp_ratio={self.mlp_ratio} (expected > 0)")
    if problems:
      raise ValueError("invalid MMDiTConfig: " + "; ".join(problems))

  # Derived sizes.
  @property
  def hidden_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def mlp_in_features(self) -> int:
    """Output width of the first MLP linear (twice the hidden size for SwiGLU: gate and up)."""
    return self.mlp_hidden * (2 if self.mlp == "swiglu" else 1)

  @property
  def n_axes(self) -> int:
    return len(self.axes_dims)

  # Serialisation.
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["axes_dims"] = list(self.axes_dims)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MMDiTConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in d and f.default is dataclasses.MISSING)
    if unknown or missing:
      raise ValueError(f"MMDiTConfig dict: unknown keys {unknown}, missing keys {missing}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "MMDiTConfig":
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_diffusers(cls, d: dict[str, Any]) -> "MMDiTConfig":
    """Builds the config from a diffusers `config.json` dict.

    Accepts `FluxTransformer2DModel` and `Flux2TransformerModel` configs. The class is taken from `_class_name`
    when present, else from the fields only FLUX.2 has. Missing fields take diffusers' defaults for that class.
    """
    cls_name = d.get("_class_name")
    if cls_name is None:
      flux2_only = {"timestep_guidance_channels", "rope_theta", "mlp_ratio", "eps"}
      cls_name = "Flux2Transformer2DModel" if flux2_only & set(d) else "FluxTransformer2DModel"
    if cls_name not in _DIFFUSERS_DEFAULTS:
      raise ValueError(f"diffusers config has _class_name={cls_name!r}; expected one of {sorted(_DIFFUSERS_DEFAULTS)}")
    defaults = _DIFFUSERS_DEFAULTS[cls_name]
    unknown = sorted(k for k in d if not k.startswith("_") and k not in defaults)
    if unknown:
      raise ValueError(f"diffusers {cls_name} config has unknown fields {unknown}")
    c = {**defaults, **{k: v for k, v in d.items() if not k.startswith("_")}}
    if c["patch_size"] != 1:
      raise ValueError(f"diffusers config patch_size={c['patch_size']}: only patch_size=1 (FLUX packing) is supported")
    common = dict(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"] or c["in_channels"],
        num_heads=c["num_attention_heads"],
        head_dim=c["attention_head_dim"],
        depth_double=c["num_layers"],
        depth_single=c["num_single_layers"],
        context_dim=c["joint_attention_dim"],
        guidance_embed=bool(c["guidance_embeds"]),
        axes_dims=tuple(c["axes_dims_rope"]),
    )
    if cls_name == "FluxTransformer2DModel":
      return cls(family="flux1", pooled_dim=c["pooled_projection_dim"], mlp_ratio=4.0, mlp="gelu", bias=True,
                 shared_modulation=False, theta=10000.0, **common)
    return cls(family="flux2", pooled_dim=0, mlp_ratio=float(c["mlp_ratio"]), mlp="swiglu", bias=False,
               shared_modulation=True, theta=float(c["rope_theta"]), eps=float(c["eps"]),
               time_channels=c["timestep_guidance_channels"], **common)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers `config.json` dict of this architecture (inverse of `from_diffusers`, but for
    `reference_attention`: diffusers tells a KV model by its pipeline, not by the transformer's config)."""
    common = dict(
        patch_size=1, in_channels=self.in_channels, out_channels=self.out_channels,
        num_layers=self.depth_double, num_single_layers=self.depth_single,
        attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
        joint_attention_dim=self.context_dim, guidance_embeds=self.guidance_embed,
        axes_dims_rope=list(self.axes_dims))
    if self.family == "flux1":
      return {"_class_name": "FluxTransformer2DModel", "pooled_projection_dim": self.pooled_dim, **common}
    return {"_class_name": "Flux2Transformer2DModel", "timestep_guidance_channels": self.time_channels,
            "mlp_ratio": self.mlp_ratio, "rope_theta": self.theta, "eps": self.eps, **common}

  def replace(self, **changes) -> "MMDiTConfig":
    return dataclasses.replace(self, **changes)


# diffusers 0.42.1 constructor defaults (the fields a config.json may omit).
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    "Flux2Transformer2DModel": dict(
        patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48,
        attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True),
}


def _flux1(**changes) -> MMDiTConfig:
  base = dict(family="flux1", in_channels=64, out_channels=64, num_heads=24, head_dim=128, depth_double=19,
              depth_single=38, context_dim=4096, pooled_dim=768, mlp_ratio=4.0, mlp="gelu", bias=True,
              shared_modulation=False, guidance_embed=True, axes_dims=(16, 56, 56), theta=10000.0)
  return MMDiTConfig(**{**base, **changes})


def _flux2(**changes) -> MMDiTConfig:
  base = dict(family="flux2", in_channels=128, out_channels=128, num_heads=48, head_dim=128, depth_double=8,
              depth_single=48, context_dim=15360, pooled_dim=0, mlp_ratio=3.0, mlp="swiglu", bias=False,
              shared_modulation=True, guidance_embed=True, axes_dims=(32, 32, 32, 32), theta=2000.0)
  return MMDiTConfig(**{**base, **changes})


PRESETS: dict[str, MMDiTConfig] = {
    "flux1-dev": _flux1(),
    "flux1-schnell": _flux1(guidance_embed=False),
    "flux1-kontext-dev": _flux1(),
    "flux2-dev": _flux2(),
    "flux2-klein-4b": _flux2(num_heads=24, depth_double=5, depth_single=20, context_dim=7680, guidance_embed=False),
    "flux2-klein-9b": _flux2(num_heads=32, depth_double=8, depth_single=24, context_dim=12288, guidance_embed=False),
    "flux2-klein-9b-kv": _flux2(num_heads=32, depth_double=8, depth_single=24, context_dim=12288, guidance_embed=False,
                                reference_attention="kv"),
}


def preset(name: str) -> MMDiTConfig:
  """The architecture of a released FLUX model, by name (see `PRESETS`)."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
