"""Tiny diffusers FLUX transformers with random weights, and matching inputs, for parity tests (test-only torch)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

from sparse_context_jax import MMDiTConfig


def tiny_flux1(*, heads=2, head_dim=16, axes=(4, 6, 6), layers=(2, 2), guidance=True, in_channels=16,
               context=32, pooled=24, seed=0):
  torch.manual_seed(seed)
  m = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=None, num_layers=layers[0],
                             num_single_layers=layers[1], attention_head_dim=head_dim, num_attention_heads=heads,
                             joint_attention_dim=context, pooled_projection_dim=pooled, guidance_embeds=guidance,
                             axes_dims_rope=axes).eval()
  randomize(m, seed)
  return m


def tiny_flux2(*, heads=2, head_dim=16, axes=(4, 4, 4, 4), layers=(2, 2), guidance=False, in_channels=32,
               context=48, mlp_ratio=3.0, seed=0):
  torch.manual_seed(seed)
  m = Flux2Transformer2DModel(patch_size=1, in_channels=in_channels, out_channels=None, num_layers=layers[0],
                              num_single_layers=layers[1], attention_head_dim=head_dim, num_attention_heads=heads,
                              joint_attention_dim=context, timestep_guidance_channels=256, mlp_ratio=mlp_ratio,
                              axes_dims_rope=axes, rope_theta=2000, eps=1e-6, guidance_embeds=guidance).eval()
  randomize(m, seed)
  return m


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
  """Re-draws every parameter, so no zero- or one-initialised tensor can hide a mapping error."""
  g = torch.Generator().manual_seed(seed + 1000)
  for name, p in model.named_parameters():
    if p.ndim == 2:
      p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    elif name.endswith("bias"):
      p.copy_(0.1 * torch.randn(p.shape, generator=g))
    else:  # norm scales
      p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def config_of(model) -> MMDiTConfig:
  return MMDiTConfig.from_diffusers(dict(model.config))


def state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def grid_ids(h: int, w: int, first: float, n_axes: int) -> np.ndarray:
  """Row-major ids of an h x w token grid: (first, r, c) for FLUX.1, (first, r, c, 0) for FLUX.2."""
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ids = np.stack([np.full(h * w, first), r.ravel(), c.ravel()] + [np.zeros(h * w)] * (n_axes - 3), axis=-1)
  return ids.astype(np.float32)


def make_inputs(cfg: MMDiTConfig, *, batch=2, txt_len=7, target=(4, 4), refs=((4, 4),), timesteps=None,
                seed=0) -> dict[str, np.ndarray]:
  """Kontext-style (FLUX.1: refs at t=1) or multi-reference (FLUX.2: ref i at t=10+10i) inputs, float32."""
  rng = np.random.default_rng(seed)
  ids = [grid_ids(*target, 0, cfg.n_axes)]
  for i, (h, w) in enumerate(refs):
    ids.append(grid_ids(h, w, 1 if cfg.family == "flux1" else 10 + 10 * i, cfg.n_axes))
  img_ids = np.concatenate(ids)
  if cfg.family == "flux1":
    txt_ids = np.zeros((txt_len, 3), np.float32)
  else:
    txt_ids = np.zeros((txt_len, 4), np.float32)
    txt_ids[:, 3] = np.arange(txt_len)
  x = {
      "img": rng.standard_normal((batch, len(img_ids), cfg.in_channels)).astype(np.float32),
      "txt": rng.standard_normal((batch, txt_len, cfg.context_dim)).astype(np.float32),
      "timesteps": (np.asarray(timesteps, np.float32) if timesteps is not None
                    else rng.uniform(0.05, 1.0, batch).astype(np.float32)),
      "img_ids": img_ids,
      "txt_ids": txt_ids,
  }
  if cfg.pooled_dim:
    x["y"] = rng.standard_normal((batch, cfg.pooled_dim)).astype(np.float32)
  if cfg.guidance_embed:
    x["guidance"] = rng.uniform(1.0, 5.0, batch).astype(np.float32)
  return x


@torch.no_grad()
def torch_forward(model, x: dict[str, np.ndarray]) -> np.ndarray:
  t = lambda a: torch.from_numpy(np.asarray(a))
  kw = dict(hidden_states=t(x["img"]), encoder_hidden_states=t(x["txt"]), timestep=t(x["timesteps"]),
            img_ids=t(x["img_ids"]), txt_ids=t(x["txt_ids"]), return_dict=False)
  if "guidance" in x:
    kw["guidance"] = t(x["guidance"])
  if "y" in x:
    kw["pooled_projections"] = t(x["y"])
  return model(**kw)[0].numpy()


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
