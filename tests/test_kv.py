"""The reference K/V cache: extract and cached calls equal diffusers' Flux2Transformer2DModel in its KV modes; the
padding of a sparse bucket is never attended to; scanned, unrolled and rematerialised stacks agree."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from conftest import inputs, jax_model, torch_model
from sparse_context_jax.model.reference_kv import ReferenceKV, cache_bytes
from sparse_context_jax.programs import ModuleProgram

FLUX2 = ["flux2-klein-1ref", "flux2-klein-2ref", "flux2-dev-3ref"]


@functools.lru_cache(maxsize=None)
def program(name: str, **model_kw) -> ModuleProgram:
  """`program(inputs dict, **static)`: the converted model called through one compiled program per signature."""
  return ModuleProgram(jax_model(name, **model_kw), lambda m, x, **static: m(**x, **static), "kv")


def _call(name, x, **static):
  x = {k: (v if isinstance(v, ReferenceKV) else jnp.asarray(v)) for k, v in x.items() if v is not None}
  return program(name)(x, **static)


def _split(name, x):
  """(target inputs, number of target tokens, reference tokens and their ids) of the dense test inputs."""
  n = int(np.sum(x["img_ids"][:, 0] == 0))
  target = {**x, "img": x["img"][:, :n], "img_ids": x["img_ids"][:n]}
  return target, n, x["img"][:, n:], x["img_ids"][n:]


def _torch_extract_and_cached(name, x, next_x, ref_fixed_timestep):
  """diffusers: extract on `[refs | target]`, then cached on the next target; outputs and the cache."""
  tm = ref.with_kv_processors(torch_model(name))
  target, n, refs, ref_ids = _split(name, x)
  img, ids = np.concatenate([refs, target["img"]], 1), np.concatenate([ref_ids, target["img_ids"]])
  extract, cache = ref.torch_kv_forward(tm, img, x["txt"], x["timesteps"], ids, x["txt_ids"], x.get("guidance"),
                                        kv_cache_mode="extract", num_ref_tokens=refs.shape[1],
                                        ref_fixed_timestep=ref_fixed_timestep)
  cached, _ = ref.torch_kv_forward(tm, next_x["img"], next_x["txt"], next_x["timesteps"], next_x["img_ids"],
                                   next_x["txt_ids"], next_x.get("guidance"), kv_cache=cache, kv_cache_mode="cached")
  return extract, cached, cache


def _next_step(name, x, seed=7):
  """The target of a later step: new target latents and timesteps, same prompt."""
  target = _split(name, x)[0]
  rng = np.random.default_rng(seed)
  return {**target, "img": rng.standard_normal(target["img"].shape).astype(np.float32),
          "timesteps": rng.uniform(0.05, 1.0, x["timesteps"].shape).astype(np.float32)}


@pytest.mark.parametrize("name, ref_fixed_timestep", [(n, 0.0) for n in FLUX2] + [("flux2-klein-2ref", 0.3)])
def test_extract_and_cached_equal_diffusers(name, ref_fixed_timestep):
  """Our sequence is [txt | target | refs], diffusers' [txt | refs | target]: the same outputs and the same cache."""
  x = inputs(name)
  nxt = _next_step(name, x)
  want_extract, want_cached, want_cache = _torch_extract_and_cached(name, x, nxt, ref_fixed_timestep)
  _, n, refs, _ = _split(name, x)
  out, cache = _call(name, x, kv_cache_mode="extract", num_ref_tokens=refs.shape[1],
                     ref_fixed_timestep=ref_fixed_timestep)
  assert out.shape == x["img"].shape[:2] + (want_extract.shape[-1],)
  errors = {"extract": ref.rel_err(out[:, :n], want_extract)}
  for stack, layers in (("double", want_cache.double_block_caches), ("single", want_cache.single_block_caches)):
    k, v = getattr(cache, stack)
    assert k.shape == (len(layers), *layers[0].k_ref.shape)
    errors[f"{stack} K/V"] = max(max(ref.rel_err(k[i], c.k_ref.numpy()), ref.rel_err(v[i], c.v_ref.numpy()))
                                 for i, c in enumerate(layers))
  errors["cached"] = ref.rel_err(_call(name, {**nxt, "kv_cache": cache}, kv_cache_mode="cached"), want_cached)
  print(f"{name} (ref timestep {ref_fixed_timestep}): " + ", ".join(f"{k} {e:.2e}" for k, e in errors.items()))
  assert max(errors.values()) <= 1e-5


def test_extract_is_not_the_joint_forward():
  """The KV model is another function of the same weights: its target rows differ from the joint call's."""
  name = "flux2-klein-1ref"
  x = inputs(name)
  out, _ = _call(name, x, kv_cache_mode="extract", num_ref_tokens=_split(name, x)[2].shape[1])
  n = _split(name, x)[1]
  assert ref.rel_err(out[:, :n], _call(name, x)[:, :n]) > 1e-2


def _padded(name, x, seed=0):
  """Each example keeps a different prefix-free subset of the reference tokens, padded to a common bucket."""
  rng = np.random.default_rng(seed)
  target, n, refs, ref_ids = _split(name, x)
  B, M = refs.shape[:2]
  kept = [M - 1 - 2 * b for b in range(B)]
  slots = max(kept) + 3
  img = rng.standard_normal((B, n + slots, refs.shape[-1])).astype(np.float32)
  ids = rng.integers(0, 50, (B, n + slots, ref_ids.shape[-1])).astype(np.float32)
  singles = []
  for b in range(B):
    rows = np.sort(rng.choice(M, kept[b], replace=False))
    img[b, :n], ids[b, :n] = target["img"][b], target["img_ids"]
    img[b, n:n + kept[b]], ids[b, n:n + kept[b]] = refs[b, rows], ref_ids[rows]
    singles.append({**{k: v[b:b + 1] for k, v in x.items() if k not in ("img_ids", "txt_ids")},
                    "img": img[b:b + 1, :n + kept[b]], "img_ids": ids[b, :n + kept[b]], "txt_ids": x["txt_ids"]})
  padded = {**x, "img": img, "img_ids": ids, "img_lengths": np.asarray([n + k for k in kept], np.int32)}
  return padded, n, slots, kept, singles


@pytest.mark.parametrize("name", ["flux2-klein-2ref", "flux2-dev-3ref"])
def test_padding_of_a_bucket_is_never_attended_to(name):
  """Extract on a padded bucket equals extract on each example's kept tokens alone (outputs and valid cache rows);
  cached with the padded cache equals cached with each unpadded one; padding may hold nan and inf."""
  x = inputs(name)
  padded, n, slots, kept, singles = _padded(name, x)
  padded["img"][0, n + kept[0]:] = np.nan
  padded["img"][1, n + kept[1]:] = np.inf
  out, cache = _call(name, padded, kv_cache_mode="extract", num_ref_tokens=slots)
  np.testing.assert_array_equal(cache.lengths, kept)
  nxt = _next_step(name, x)
  cached = np.asarray(_call(name, {**nxt, "kv_cache": cache}, kv_cache_mode="cached"))
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(cached))
  for b, single in enumerate(singles):
    one, one_cache = _call(name, single, kv_cache_mode="extract", num_ref_tokens=kept[b])
    assert ref.rel_err(out[b, :n], one[0, :n]) <= 1e-5
    assert np.all(np.asarray(out[b, n + kept[b]:]) == 0)
    for stack in ("double", "single"):
      for got, want in zip(getattr(cache, stack), getattr(one_cache, stack)):
        assert ref.rel_err(got[:, b, :kept[b]], want[:, 0]) <= 1e-5
    one_next = {**{k: v[b:b + 1] for k, v in nxt.items() if k not in ("img_ids", "txt_ids")},
                "img_ids": nxt["img_ids"], "txt_ids": nxt["txt_ids"], "kv_cache": one_cache}
    assert ref.rel_err(cached[b], _call(name, one_next, kv_cache_mode="cached")[0]) <= 1e-5


def test_full_lengths_equal_no_lengths_bit_for_bit():
  """A full bucket (lengths given, no padding) gives the dense call's target rows, cache and cached step exactly."""
  name = "flux2-klein-2ref"
  x = inputs(name)
  _, n, refs, _ = _split(name, x)
  full = {**x, "img_lengths": np.full(x["img"].shape[0], x["img"].shape[1], np.int32)}
  a, cache_a = _call(name, x, kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
  b, cache_b = _call(name, full, kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
  np.testing.assert_array_equal(a[:, :n], b[:, :n])
  for u, v in zip(jax_leaves(cache_a), jax_leaves(cache_b)):
    np.testing.assert_array_equal(u, v)
  nxt = _next_step(name, x)
  np.testing.assert_array_equal(_call(name, {**nxt, "kv_cache": cache_a}, kv_cache_mode="cached"),
                                _call(name, {**nxt, "kv_cache": cache_b}, kv_cache_mode="cached"))


@pytest.mark.parametrize("model_kw", [dict(scan_layers=False), dict(remat="dots")])
def test_unrolled_and_remat_stacks_equal_the_scan(model_kw):
  name = "flux2-dev-3ref"
  x = inputs(name)
  nr = _split(name, x)[2].shape[1]
  kw = dict(kv_cache_mode="extract", num_ref_tokens=nr)
  jx = {k: jnp.asarray(v) for k, v in x.items()}
  out, cache = program(name)(jx, **kw)
  out2, cache2 = program(name, **model_kw)(jx, **kw)
  assert ref.rel_err(out2, out) <= 1e-6
  for a, b in zip(jax_leaves(cache), jax_leaves(cache2)):
    assert ref.rel_err(b, a) <= 1e-6
  nxt = {k: jnp.asarray(v) for k, v in _next_step(name, x).items()}
  assert ref.rel_err(program(name, **model_kw)({**nxt, "kv_cache": cache2}, kv_cache_mode="cached"),
                     program(name)({**nxt, "kv_cache": cache}, kv_cache_mode="cached")) <= 1e-6


def jax_leaves(cache):
  return [a for kv in cache.stacks() for a in kv]


def test_cache_size():
  name = "flux2-dev-3ref"
  x = inputs(name)
  nr = _split(name, x)[2].shape[1]
  _, cache = _call(name, x, kv_cache_mode="extract", num_ref_tokens=nr)
  cfg = jax_model(name).config
  assert cache.num_ref_tokens == nr and cache.batch == x["img"].shape[0]
  assert cache.nbytes == cache_bytes(cfg, x["img"].shape[0], nr, jnp.float32)
  assert cache.nbytes == 2 * 4 * 2 * nr * cfg.hidden_size * (cfg.depth_double + cfg.depth_single)


def test_bad_kv_arguments_are_named():
  name = "flux2-klein-1ref"
  x = inputs(name)
  model = jax_model(name)
  jx = {k: jnp.asarray(v) for k, v in x.items()}
  L = x["img"].shape[1]
  with pytest.raises(ValueError, match="kv_cache_mode='cache'"):
    model(**jx, kv_cache_mode="cache")
  with pytest.raises(ValueError, match=f"num_ref_tokens={L}: extracting needs"):
    model(**jx, kv_cache_mode="extract", num_ref_tokens=L)
  with pytest.raises(ValueError, match="needs the kv_cache of an extract call"):
    model(**jx, kv_cache_mode="cached")
  _, cache = model(**jx, kv_cache_mode="extract", num_ref_tokens=6)
  with pytest.raises(ValueError, match="read only when 'cached'"):
    model(**jx, kv_cache=cache)
  short = {**jx, "img": jx["img"][:1], "timesteps": jx["timesteps"][:1], "txt": jx["txt"][:1]}
  with pytest.raises(ValueError, match=r"kv_cache.double has shapes .* expected \[\(2, 1, 6"):
    model(**short, kv_cache=cache, kv_cache_mode="cached")
  flux1 = jax_model("flux1-kontext")
  with pytest.raises(ValueError, match="needs a FLUX.2 model"):
    flux1(**{k: jnp.asarray(v) for k, v in inputs("flux1-kontext").items()}, kv_cache_mode="extract",
          num_ref_tokens=4)


def test_training_a_kv_model_fits_its_extract_call():
  """`loss_sums` of a KV config is the flow-matching loss of the extract call (the function the KV loop samples
  with), not of the joint call."""
  import types

  from flax import nnx

  from sparse_context_jax.model.positions import image_ids, text_ids
  from sparse_context_jax.sparse.buckets import rung_at
  from sparse_context_jax.train.objective import loss_sums

  joint = jax_model("flux2-klein-2ref")
  kv = nnx.merge(*nnx.split(joint))
  kv.config = joint.config.replace(reference_attention="kv")
  cfg, grid, B, R = joint.config, (2, 3), 2, 2
  rng = np.random.default_rng(3)
  n = grid[0] * grid[1]
  batch = {"target": rng.standard_normal((B, n, cfg.in_channels)),
           "refs": rng.standard_normal((B, R, n, cfg.in_channels)), "ref_valid": np.ones((B, R), bool), "txt": rng.standard_normal((B, 5, cfg.context_dim)),
           "weight": np.ones(B), "t": rng.uniform(0.1, 0.9, B), "drop_scores": rng.uniform(size=(B, R, n))}
  batch["eps"] = batch["target"]   # a zero velocity target: the loss is the mean square of the prediction
  batch = {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype) for k, v in batch.items()}
  rung = rung_at(1.0, (grid,) * R)
  objective = types.SimpleNamespace(guidance=None)
  t, x0, eps = batch["t"][:, None, None], batch["target"], batch["eps"]
  img = jnp.concatenate([(1 - t) * x0 + t * eps] + [batch["refs"][:, i] for i in range(R)], axis=1)
  ids = np.concatenate([image_ids(cfg, *grid)] + [image_ids(cfg, *grid, 10 + 10 * i) for i in range(R)])
  out, _ = kv(img, batch["txt"], batch["t"], jnp.asarray(ids), jnp.asarray(text_ids(cfg, 5)),
              kv_cache_mode="extract", num_ref_tokens=R * n)
  want = float(jnp.sum(jnp.mean(jnp.square(out[:, :n] - (eps - x0)), axis=(1, 2))))
  got, weight = loss_sums(kv, objective, batch, rung)
  assert float(weight) == B and abs(float(got) - want) <= 1e-5 * want
  # the two functions' predictions differ by ~1e-2, their mean squares by ~1e-3 (float rounding: ~1e-7)
  assert abs(float(loss_sums(joint, objective, batch, rung)[0]) - want) > 1e-4 * want
