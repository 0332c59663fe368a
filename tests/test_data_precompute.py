"""precompute: a dataset -> latent records through pluggable encoders (test doubles here, never product defaults),
and the command's refusal to run without real encoders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sparse_context_jax.data import world, write_dataset
from sparse_context_jax.data.precompute import Encoders, Latents, mask_tokens, precompute


def _double_image(x):
  """TEST DOUBLE of a VAE: (N, H, W, 3) -> (N, H/8, W/8, 4), 8x8 average pooling then a fixed channel map."""
  n, h, w, _ = x.shape
  pooled = x.reshape(n, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
  return pooled @ np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], np.float32)


def _double_text(captions):
  """TEST DOUBLE of a text encoder: character codes of each caption, (N, 8) embeddings and a (N,) length."""
  codes = np.zeros((len(captions), 8), np.float32)
  for i, c in enumerate(captions):
    codes[i, :min(8, len(c))] = [ord(ch) for ch in c[:8]]
  return {"embeddings": codes, "length": np.array([len(c) for c in captions], np.int32)}


def double_encoders() -> Encoders:
  return Encoders("test-double", _double_image, _double_text)


def test_precompute_writes_one_record_per_example_with_its_latents(tmp_path):
  records = world.WorldRecords(10, seed=1, size=(32, 32), max_refs=3)
  data = write_dataset(records, tmp_path / "w", max_refs=3, metadata=records.metadata())
  count = precompute(data, tmp_path / "lat", double_encoders(), batch_size=4, resolution=32)
  lat = Latents(tmp_path / "lat")
  assert count == len(lat) == 10 and lat.info["encoders"] == "test-double"
  assert sorted(int(lat[i]["index"]) for i in range(10)) == list(range(10))   # padding never written
  for i in range(10):
    r = lat[i]
    ex = world.example(1, int(r["index"]), (32, 32), 3)
    n = len(ex.references)
    np.testing.assert_allclose(r["target_latent"], _double_image(ex.target[None] / 127.5 - 1)[0], atol=1e-5)
    assert r["reference_latents"].shape == (3, 4, 4, 4) and r["ref_valid"].tolist() == [True] * n + [False] * (3 - n)
    np.testing.assert_allclose(r["reference_latents"][n - 1],
                               _double_image(ex.references[n - 1][None] / 127.5 - 1)[0], atol=1e-5)
    assert not r["reference_latents"][n:].any()
    np.testing.assert_array_equal(r["mask_tokens"][0], mask_tokens(ex.masks[0]))
    assert str(r["caption"]) == ex.caption and r["text_length"] == len(ex.caption)
    assert r["text_embeddings"][0] == ord(ex.caption[0])


def test_mask_tokens_is_the_patch_coverage():
  m = np.zeros((32, 48), np.uint8)
  m[:16, :8] = 255
  np.testing.assert_array_equal(mask_tokens(m), [[0.5, 0, 0], [0, 0, 0]])


def _cli(*args):
  # this folder on the path, so --encoders can name the test doubles of this module
  here = Path(__file__).parent
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", *map(str, args)], capture_output=True,
                        text=True, timeout=120, env=env)


def test_command_needs_encoders_and_runs_with_given_ones(tmp_path):
  records = world.WorldRecords(3, seed=0, size=(32, 32))
  data = write_dataset(records, tmp_path / "w", metadata=records.metadata())
  r = _cli("precompute", data, tmp_path / "lat")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: precompute needs --encoders: vae:PATH")
  assert not (tmp_path / "lat").exists()
  r = _cli("precompute", data, tmp_path / "lat", "--encoders", "test_data_precompute:double_encoders",
           "--resolution", "32")
  assert r.returncode == 0, r.stderr
  assert "wrote 3 latent records (test-double)" in r.stdout and len(Latents(tmp_path / "lat")) == 3
