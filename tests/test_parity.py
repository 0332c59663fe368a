"""The JAX MMDiT equals diffusers' FluxTransformer2DModel / Flux2Transformer2DModel on tiny random fp32 models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models import embeddings as diffusers_embeddings

import reference as ref
from conftest import TINY, as_jax, inputs, jax_model, jitted, torch_model


def test_parity_with_diffusers(tiny_name):
  x = inputs(tiny_name)
  expected = ref.torch_forward(torch_model(tiny_name), x)
  got = jitted(tiny_name)(x)
  assert got.shape == expected.shape
  err = ref.rel_err(got, expected)
  print(f"{tiny_name}: relative error {err:.2e}")
  assert err <= 1e-5


def test_parity_eager_with_batched_ids():
  """Outside jit, and with (B, L, n) ids, the answer is the same as diffusers (which takes the ids of example 0)."""
  name = "flux2-dev-3ref"
  x = inputs(name)
  expected = ref.torch_forward(torch_model(name), x)
  B = x["img"].shape[0]
  x3 = {**x, "img_ids": np.broadcast_to(x["img_ids"], (B, *x["img_ids"].shape)),
        "txt_ids": np.broadcast_to(x["txt_ids"], (B, *x["txt_ids"].shape))}
  assert ref.rel_err(jax_model(name)(**as_jax(x3)), expected) <= 1e-5


@pytest.mark.parametrize("name", [n for n in sorted(TINY) if TINY[n][0].get("guidance", n.startswith("flux1"))])
def test_guidance_residual_is_the_references_float32_frequencies(name, monkeypatch):
  """With guidance (x1000, up to 5000 rad), most of the remaining difference is diffusers' float32 `exp` of the
  sinusoid frequencies (one ulp off on a few of them). Given correctly rounded frequencies, diffusers agrees with
  this port to 5e-7."""
  def correctly_rounded(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                        max_period=10000):
    half = embedding_dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - downscale_freq_shift)
    freqs = torch.from_numpy(np.exp(exponent.astype(np.float32).astype(np.float64)).astype(np.float32))
    args = timesteps[:, None].float() * freqs[None, :] * scale
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb

  x = inputs(name)
  got = jitted(name)(x)
  plain = ref.rel_err(got, ref.torch_forward(torch_model(name), x))
  monkeypatch.setattr(diffusers_embeddings, "get_timestep_embedding", correctly_rounded)
  exact = ref.rel_err(got, ref.torch_forward(torch_model(name), x))
  print(f"{name}: relative error {plain:.2e} as shipped, {exact:.2e} with correctly rounded frequencies")
  assert exact <= 1e-6
  assert exact < plain
