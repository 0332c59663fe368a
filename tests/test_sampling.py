"""Schedules equal diffusers' FlowMatchEulerDiscreteScheduler; the compiled loop equals diffusers' model + scheduler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import reference as ref
from conftest import jax_model, torch_model
from sparse_context_jax import preset
from sparse_context_jax.programs import ModuleProgram
from sparse_context_jax.sampling import Conditioning, denoise, flux1_mu, flux2_mu, schedule_for, sigmas
from sparse_context_jax.sparse import Reference, SparsePacker, SparseRequest, dense_inputs

FLUX1_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096, shift=3.0)


def _diffusers_sigmas(steps, mu, **config):
  s = FlowMatchEulerDiscreteScheduler(**config)
  s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
  return s


@pytest.mark.parametrize("n_tokens", [256, 1024, 4096, 6000])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedules_equal_diffusers(n_tokens, steps):
  dev = _diffusers_sigmas(steps, flux1_mu(n_tokens), **FLUX1_SCHEDULER).sigmas.numpy()
  schnell = _diffusers_sigmas(steps, None).sigmas.numpy()
  flux2 = _diffusers_sigmas(steps, flux2_mu(n_tokens, steps), use_dynamic_shifting=True).sigmas.numpy()
  np.testing.assert_array_equal(schedule_for(preset("flux1-dev"), n_tokens, steps), dev)
  np.testing.assert_array_equal(schedule_for(preset("flux1-kontext-dev"), n_tokens, steps), dev)
  np.testing.assert_array_equal(schedule_for(preset("flux1-schnell"), n_tokens, steps), schnell)
  for name in ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b"):
    np.testing.assert_array_equal(schedule_for(preset(name), n_tokens, steps), flux2)


def test_mu_values_of_the_spec():
  assert flux1_mu(1024) == pytest.approx(0.630, abs=5e-4) and flux1_mu(4096) == pytest.approx(1.15)
  assert flux2_mu(4096, 4) == pytest.approx(2.2912, abs=1e-4) and flux2_mu(4096, 50) == pytest.approx(2.0234, abs=1e-4)
  assert flux2_mu(1024, 4) == pytest.approx(2.0307, abs=1e-4) and flux2_mu(1024, 50) == pytest.approx(1.7020, abs=1e-4)
  with pytest.raises(ValueError, match="steps=0"):
    sigmas(0, None)


@torch.no_grad()
def _torch_loop(model, scheduler, noise, refs, x, n, cfg_scale=None, neg=None):
  """The diffusers pipelines' loop (Flux Kontext / Flux2 Klein) on given latents and conditioning."""
  t_ = lambda a: torch.from_numpy(np.asarray(a))
  latents = t_(noise)
  for t in scheduler.timesteps:
    kw = dict(encoder_hidden_states=t_(x["txt"]), timestep=t.expand(latents.shape[0]) / 1000,
              img_ids=t_(x["img_ids"]), txt_ids=t_(x["txt_ids"]), return_dict=False)
    if "guidance" in x:
      kw["guidance"] = t_(x["guidance"])
    if "y" in x:
      kw["pooled_projections"] = t_(x["y"])
    hidden = torch.cat([latents, t_(refs)], dim=1)
    pred = model(hidden_states=hidden, **kw)[0][:, :n]
    if cfg_scale is not None:
      kw["encoder_hidden_states"] = t_(neg)
      pred_neg = model(hidden_states=hidden, **kw)[0][:, :n]
      pred = pred_neg + cfg_scale * (pred - pred_neg)
    latents = scheduler.step(pred, t, latents, return_dict=False)[0]
  return latents.numpy()


@pytest.mark.parametrize("name, steps, cfg_scale", [("flux1-kontext", 4, None), ("flux2-klein-2ref", 3, 4.0)])
def test_denoising_loop_equals_diffusers(name, steps, cfg_scale):
  tm = torch_model(name)
  cfg = ref.config_of(tm)
  refs_hw = ((4, 4),) if cfg.family == "flux1" else ((2, 3), (3, 2))
  x = ref.make_inputs(cfg, batch=2, target=(4, 4), refs=refs_hw, seed=5)
  n = 16
  rng = np.random.default_rng(6)
  noise = rng.standard_normal((2, n, cfg.in_channels)).astype(np.float32)
  refs = x["img"][:, n:]
  neg = rng.standard_normal(x["txt"].shape).astype(np.float32) if cfg_scale else None
  if cfg.family == "flux1":
    scheduler = _diffusers_sigmas(steps, flux1_mu(n), **FLUX1_SCHEDULER)
  else:
    scheduler = _diffusers_sigmas(steps, flux2_mu(n, steps), use_dynamic_shifting=True)
  with ref.exact_sinusoids():
    expected = _torch_loop(tm, scheduler, noise, refs, x, n, cfg_scale, neg)

  model = jax_model(name)
  sample = ModuleProgram(model, denoise, "sample")
  cond = Conditioning(refs=jnp.asarray(refs), img_ids=jnp.asarray(x["img_ids"]), txt=jnp.asarray(x["txt"]),
                      txt_ids=jnp.asarray(x["txt_ids"]), y=x.get("y"), guidance=x.get("guidance"),
                      neg_txt=None if neg is None else jnp.asarray(neg), neg_y=x.get("y"))
  got = sample(jnp.asarray(noise), jnp.asarray(schedule_for(cfg, n, steps)), cond,
               None if cfg_scale is None else jnp.float32(cfg_scale))
  err = ref.rel_err(got, expected)
  print(f"{name}: {steps} steps, cfg {cfg_scale}: latents relative error {err:.2e}")
  assert err <= 1e-4


def _two_references():
  """A two-reference FLUX.2 model with its packer, and a batch of 2: noise (2, 16 tokens), two references, text."""
  model = jax_model("flux2-klein-2ref")
  cfg = model.config
  rng = np.random.default_rng(0)
  n = 16
  noise = jnp.asarray(rng.standard_normal((2, n, cfg.in_channels)).astype(np.float32))
  refs = [Reference(rng.standard_normal((2, 16, cfg.in_channels)).astype(np.float32), (64, 64)) for _ in range(2)]
  return model, cfg, (64, 64), n, noise, refs, ref.make_inputs(cfg, batch=2, txt_len=5), SparsePacker(cfg)


def test_sparse_references_in_the_loop():
  """Keep 1 through the packer equals the dense loop exactly; a sparse loop runs in the same compiled program
  shape family and stays finite."""
  model, cfg, size, n, noise, refs, txt, packer = _two_references()
  sample = ModuleProgram(model, denoise, "sample")
  s = jnp.asarray(schedule_for(cfg, n, 3))

  def run(x, lengths=True):
    cond = Conditioning(refs=x.img[:, n:], img_ids=x.img_ids, img_lengths=x.img_lengths if lengths else None,
                        txt=jnp.asarray(txt["txt"]), txt_ids=jnp.asarray(txt["txt_ids"]))
    return np.asarray(sample(noise, s, cond))

  full = packer(noise, size, refs, SparseRequest("random", keep=1.0))
  assert np.array_equal(run(full), run(full, lengths=False))
  sparse = run(packer(noise, size, refs, SparseRequest("grid", keep=0.25)))
  assert np.all(np.isfinite(sparse)) and sparse.shape == (2, n, cfg.in_channels)


@torch.no_grad()
def _torch_kv_loop(model, scheduler, noise, refs, ref_ids, x):
  """`Flux2KleinKVPipeline`'s loop: step 0 on `[refs | target]` extracts the references' K/V, later steps run the
  target alone with the cache."""
  t_ = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  latents, cache, n = t_(noise), None, noise.shape[1]
  target_ids = x["img_ids"][:n]
  for i, t in enumerate(scheduler.timesteps):
    kw = dict(encoder_hidden_states=t_(x["txt"]), timestep=t.expand(latents.shape[0]) / 1000, txt_ids=t_(x["txt_ids"]),
              return_dict=False)
    if i == 0:
      pred, cache = model(hidden_states=torch.cat([t_(refs), latents], dim=1), img_ids=t_(np.concatenate(
          [ref_ids, target_ids])), kv_cache_mode="extract", num_ref_tokens=refs.shape[1], **kw)
    else:
      pred = model(hidden_states=latents, img_ids=t_(target_ids), kv_cache=cache, kv_cache_mode="cached", **kw)[0]
    latents = scheduler.step(pred, t, latents, return_dict=False)[0]
  return latents.numpy()


@pytest.mark.parametrize("steps", [1, 4])
def test_kv_loop_equals_diffusers_klein_kv(steps):
  name = "flux2-klein-2ref"
  tm = ref.with_kv_processors(torch_model(name))
  cfg = ref.config_of(tm)
  x = ref.make_inputs(cfg, batch=2, target=(4, 4), refs=((2, 3), (3, 2)), seed=5)
  n = 16
  noise = np.random.default_rng(6).standard_normal((2, n, cfg.in_channels)).astype(np.float32)
  refs = x["img"][:, n:]
  scheduler = _diffusers_sigmas(steps, flux2_mu(n, steps), use_dynamic_shifting=True)
  with ref.exact_sinusoids():
    expected = _torch_kv_loop(tm, scheduler, noise, refs, x["img_ids"][n:], x)
  sample = ModuleProgram(jax_model(name), denoise, "sample")
  cond = Conditioning(refs=jnp.asarray(refs), img_ids=jnp.asarray(x["img_ids"]), txt=jnp.asarray(x["txt"]),
                      txt_ids=jnp.asarray(x["txt_ids"]))
  got = sample(jnp.asarray(noise), jnp.asarray(schedule_for(cfg, n, steps)), cond, reference_kv=True)
  err = ref.rel_err(got, expected)
  print(f"klein KV loop, {steps} steps: latents relative error {err:.2e}")
  assert err <= 1e-4


def test_sparse_references_in_the_kv_loop():
  """Keep 1 through the packer (the padded path) equals the dense KV loop bit for bit; a sparse bucket's loop equals
  the loop on its kept tokens alone; budgets of one rung share one compiled program."""
  model, cfg, size, n, noise, refs, txt, packer = _two_references()
  sample, unpadded = ModuleProgram(model, denoise, "sample"), ModuleProgram(model, denoise, "unpadded")
  s = jnp.asarray(schedule_for(cfg, n, 3))
  cond = lambda refs, ids, lengths=None: Conditioning(refs=refs, img_ids=ids, img_lengths=lengths,
                                                      txt=jnp.asarray(txt["txt"]), txt_ids=jnp.asarray(txt["txt_ids"]))
  run = lambda c, program=sample: np.asarray(program(noise, s, c, reference_kv=True))

  full = packer(noise, size, refs, SparseRequest("random", keep=1.0))
  img, ids = dense_inputs(cfg, noise, size, refs)
  assert np.array_equal(run(cond(full.img[:, n:], full.img_ids, full.img_lengths)), run(cond(img[:, n:], ids)))
  before = sample.programs.count
  for keep in (0.25, 0.15):   # 4 and 3 kept tokens of 16: one rung (capacity 4)
    x = packer(noise, size, refs, SparseRequest("grid", keep=keep))
    got = run(cond(x.img[:, n:], x.img_ids, x.img_lengths))
    kept = int(x.img_lengths[0])   # grid keeps the same tokens in every example
    alone = run(cond(x.img[:, n:kept], x.img_ids[:, :kept]), unpadded)
    assert ref.rel_err(got, alone) <= 1e-5, keep
  assert sample.programs.count == before + 1 and unpadded.programs.count == 2
