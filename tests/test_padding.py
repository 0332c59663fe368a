"""`img_lengths`: padded image tokens at the end are excluded as keys and can hold anything."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import inputs, jitted, torch_model

CASES = ["flux1-kontext", "flux2-klein-2ref", "flux2-dev-3ref"]


def _padded_batch(name: str, seed: int = 0):
  """Each example keeps a different random subset of the reference tokens (with their ids), padded at the end.

  Returns the padded inputs, the valid lengths, and each example's unpadded single-example inputs.
  """
  rng = np.random.default_rng(seed)
  x = inputs(name)
  cfg = ref.config_of(torch_model(name))
  n_target = int(np.sum(x["img_ids"][:, 0] == 0))
  n_img, B = x["img"].shape[1], x["img"].shape[0]
  keeps = [n_img - n_target - 1 - 3 * b for b in range(B)]  # a different valid length per example
  capacity = max(keeps) + n_target + 4                       # at least 4 padding tokens everywhere
  padded = {k: v for k, v in x.items() if k not in ("img", "img_ids")}
  padded["img"] = rng.standard_normal((B, capacity, cfg.in_channels)).astype(np.float32)
  padded["img_ids"] = rng.integers(0, 50, (B, capacity, cfg.n_axes)).astype(np.float32)
  singles, lengths = [], []
  for b in range(B):
    rows = np.concatenate([np.arange(n_target),
                           n_target + np.sort(rng.choice(n_img - n_target, keeps[b], replace=False))])
    padded["img"][b, :len(rows)] = x["img"][b, rows]
    padded["img_ids"][b, :len(rows)] = x["img_ids"][rows]
    lengths.append(len(rows))
    single = {k: v[b:b + 1] for k, v in x.items() if k not in ("img_ids", "txt_ids")}
    singles.append({**single, "img": x["img"][b:b + 1, rows], "img_ids": x["img_ids"][rows],
                    "txt_ids": x["txt_ids"]})
  padded["img_lengths"] = np.asarray(lengths, np.int32)
  return padded, lengths, singles


@pytest.mark.parametrize("name", CASES)
def test_valid_outputs_equal_the_unpadded_sequence(name):
  forward = jitted(name)
  padded, lengths, singles = _padded_batch(name)
  out = forward(padded)
  for b, (n, single) in enumerate(zip(lengths, singles)):
    expected = forward(single)[0]
    assert ref.rel_err(out[b, :n], expected) <= 1e-5
    # and the unpadded sequence itself equals diffusers on the same tokens
    assert ref.rel_err(expected, ref.torch_forward(torch_model(name), single)[0]) <= 1e-5
    assert np.all(out[b, n:] == 0)


@pytest.mark.parametrize("name", CASES)
def test_padding_contents_and_ids_are_ignored(name):
  forward = jitted(name)
  padded, lengths, _ = _padded_batch(name)
  base = forward(padded)
  rng = np.random.default_rng(1)
  fills = [
      (lambda s: 1e30 * rng.standard_normal(s), lambda s: 1e9 * rng.standard_normal(s)),
      (lambda s: np.full(s, np.inf), lambda s: np.full(s, -1e12)),
      (lambda s: np.full(s, np.nan), lambda s: np.full(s, np.nan)),
      (lambda s: rng.standard_normal(s), lambda s: rng.integers(0, 3, s)),  # ids that collide with valid ones
  ]
  for fill_img, fill_ids in fills:
    x = {k: v.copy() for k, v in padded.items()}
    for b, n in enumerate(lengths):
      x["img"][b, n:] = fill_img(x["img"][b, n:].shape)
      x["img_ids"][b, n:] = fill_ids(x["img_ids"][b, n:].shape)
    out = forward(x)
    assert np.all(np.isfinite(out))
    for b, n in enumerate(lengths):
      assert np.max(np.abs(out[b, :n] - base[b, :n])) <= 1e-6 * np.max(np.abs(base[b, :n]))


def test_full_lengths_equal_no_mask():
  name = "flux2-klein-2ref"
  x = inputs(name)
  full = {**x, "img_lengths": np.full(x["img"].shape[0], x["img"].shape[1], np.int32)}
  assert ref.rel_err(jitted(name)(full), jitted(name)(x)) <= 1e-6
