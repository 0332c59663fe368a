"""Tiny diffusers FLUX transformers with random weights, and matching inputs, for parity tests (test-only torch).

The parity tests compare this port with the *exact* reference. diffusers computes two things in float32 whatever the
model dtype:
- the timestep and guidance sinusoids (`get_timestep_embedding`: exponent, `exp`, product and `sin`/`cos` in
  float32). Float32 `exp` differs by an ulp between machines (torch's CPU kernels round 2 or 3 of the 128
  frequencies differently on different CPUs); at guidance x 1000 (~5000 rad) that moves the embedding by up to 4e-4
  and the tiny models' outputs by 1e-5 to 4e-5, depending on the machine. This is what made the suite fail on
  some machines;
- the RoPE tables (angles in float64, cos/sin stored in float32) and their application (`apply_rotary_emb`, in
  float32): machine-independent, but they cap a float64 comparison at ~1e-8.
Within `exact_sinusoids()` those three functions run in float64 and return the model's dtype; every other
computation of the references already runs in the model dtype (diffusers' `t.to(dtype) * 1000` included).
`torch_forward` uses it unless `as_shipped=True`.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from diffusers.models import embeddings as diffusers_embeddings
from diffusers.models.transformers import transformer_flux, transformer_flux2

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


def exact_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                             downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> torch.Tensor:
  """diffusers' `get_timestep_embedding`, every step in float64, returned in the dtype of `timesteps`."""
  half = embedding_dim // 2
  exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
  args = timesteps[:, None].double() * torch.exp(exponent)[None, :] * scale
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
  if flip_sin_to_cos:
    emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
  if embedding_dim % 2 == 1:
    emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
  return emb.to(timesteps.dtype)


def exact_rotary_tables(dim: int, pos: torch.Tensor, theta: float = 10000.0, use_real: bool = False,
                        linear_factor: float = 1.0, ntk_factor: float = 1.0, repeat_interleave_real: bool = True,
                        freqs_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
  """diffusers' `get_1d_rotary_pos_embed` as FLUX calls it, with cos/sin kept in float64."""
  assert use_real and repeat_interleave_real and linear_factor == 1 and ntk_factor == 1, "not a FLUX call"
  freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
  angles = torch.outer(pos.double(), freqs)
  return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def exact_apply_rotary_emb(x: torch.Tensor, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1,
                           sequence_dim: int = 2) -> torch.Tensor:
  """diffusers' `apply_rotary_emb` as FLUX calls it (interleaved pairs), in float64, returned in x's dtype."""
  assert use_real and use_real_unbind_dim == -1, "not a FLUX call"
  cos, sin = (f.double().reshape((1, -1, 1, f.shape[-1]) if sequence_dim == 1 else (1, 1, -1, f.shape[-1]))
              for f in freqs_cis)
  x64 = x.double()
  x_real, x_imag = x64.reshape(*x.shape[:-1], -1, 2).unbind(-1)
  x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
  return (x64 * cos + x_rotated * sin).to(x.dtype)


@contextlib.contextmanager
def exact_sinusoids():
  """Within it, diffusers' FLUX transformers compute their sinusoids exactly (see the module docstring)."""
  patches = [(diffusers_embeddings, "get_timestep_embedding", exact_timestep_embedding)]
  for module in (transformer_flux, transformer_flux2):
    patches += [(module, "get_1d_rotary_pos_embed", exact_rotary_tables),
                (module, "apply_rotary_emb", exact_apply_rotary_emb)]
  shipped = [(module, name, getattr(module, name)) for module, name, _ in patches]
  try:
    for module, name, fn in patches:
      setattr(module, name, fn)
    yield
  finally:
    for module, name, fn in shipped:
      setattr(module, name, fn)


@torch.no_grad()
def torch_forward(model, x: dict[str, np.ndarray], *, as_shipped: bool = False) -> np.ndarray:
  """diffusers' forward on numpy inputs (in the model's dtype); exact sinusoids unless `as_shipped`."""
  dtype = next(model.parameters()).dtype
  t = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)
  kw = dict(hidden_states=t(x["img"]), encoder_hidden_states=t(x["txt"]), timestep=t(x["timesteps"]),
            img_ids=t(x["img_ids"]), txt_ids=t(x["txt_ids"]), return_dict=False)
  if "guidance" in x:
    kw["guidance"] = t(x["guidance"])
  if "y" in x:
    kw["pooled_projections"] = t(x["y"])
  with contextlib.nullcontext() if as_shipped else exact_sinusoids():
    return model(**kw)[0].numpy()


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def with_kv_processors(model):
  """A copy of a diffusers FLUX.2 model with the klein-KV attention processors, as `Flux2KleinKVPipeline` sets
  them (they take the K/V arguments; without them they equal the default processors)."""
  model = copy.deepcopy(model)
  for block in model.transformer_blocks:
    block.attn.set_processor(transformer_flux2.Flux2KVAttnProcessor())
  for block in model.single_transformer_blocks:
    block.attn.set_processor(transformer_flux2.Flux2KVParallelSelfAttnProcessor())
  return model


@torch.no_grad()
def torch_kv_forward(model, img, txt, timesteps, img_ids, txt_ids, guidance=None, **kv):
  """diffusers' forward with K/V arguments (`kv_cache_mode`, `num_ref_tokens`, `kv_cache`, ...), exact sinusoids;
  returns (output numpy, the diffusers cache or None)."""
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  kw = dict(hidden_states=t(img), encoder_hidden_states=t(txt), timestep=t(timesteps), img_ids=t(img_ids),
            txt_ids=t(txt_ids), return_dict=False, **kv)
  if guidance is not None:
    kw["guidance"] = t(guidance)
  with exact_sinusoids():
    out = model(**kw)
  return out[0].numpy(), (out[1] if len(out) > 1 else None)
