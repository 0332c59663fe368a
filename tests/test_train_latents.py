"""Training on precomputed latents: a tiny random FLUX.2 VAE (`vae:PATH` encoders) -> `precompute` -> the latent
pipeline (shape buckets, padding, process rows, state) -> the project's token packing -> `train` (learns, resumes
bitwise), and latent folders that do not fit the model refused in one line before any compile."""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import resumed_equals_straight
from sparse_context_jax import cli, load_vae
from sparse_context_jax.convert import save
from sparse_context_jax.data import world, write_dataset
from sparse_context_jax.data.latent_pipeline import make_latent_pipeline
from sparse_context_jax.data.precompute import load_encoders, precompute
from sparse_context_jax.model.vae import AutoencoderKL, VAEConfig, encode_tokens
from sparse_context_jax.train import config as C
from sparse_context_jax.encoders import HashedText
from sparse_context_jax.train.batches import latent_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# A FLUX.2-family VAE small enough for a CPU: 4x downsampling, 4 latent channels -> 16-channel tokens, so a 32x32
# image is 4x4 = 16 tokens like the tiny config's 64x64 pixel tokens.
VAE = VAEConfig(family="flux2", block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=1.0,
                shift_factor=0.0)
TEXT_LEN, TEXT_DIM = 8, 16
FAST = ["objective.keep_low=0.25", "objective.keep_high=0.25", "objective.dense_prob=0.0", "log.progress=False",
        "train.warmup_steps=1", "model.arch.in_channels=16", "model.arch.out_channels=16", "data.encoder=latents"]


def _write_converted_vae(path) -> None:
  """A random tiny VAE in `convert`'s output format (config.json + orbax parameters), BatchNorm statistics
  non-trivial so the normalisation is exercised."""
  vae = AutoencoderKL(VAE, rngs=nnx.Rngs(3))
  vae.bn_mean[...] = 0.1 * jnp.arange(16, dtype=jnp.float32)
  vae.bn_var[...] = 0.5 + 0.05 * jnp.arange(16, dtype=jnp.float32)
  save(vae, path)


class _TwoSizes:
  """World records, the even ones 32x32 and the odd ones 32x48: two latent shapes in one folder."""

  def __init__(self, count: int):
    self.parts = [world.WorldRecords(count, seed=0, size=(32, 32), max_refs=2),
                  world.WorldRecords(count, seed=1, size=(32, 48), max_refs=2)]
    self.sizes = [self.parts[i % 2].size for i in range(count)]

  def __len__(self) -> int:
    return len(self.sizes)

  def encoded(self, i: int) -> dict:
    return self.parts[i % 2].encoded(i)


def _precompute(records, out, vae) -> str:
  """The precompute command with `vae:PATH` encoders and stand-in text of the tiny model's context_dim."""
  data = write_dataset(records, f"{out}-data", max_refs=2)
  rc = cli.main(["precompute", str(data), str(out), "--encoders", f"vae:{vae}", "--text-len", str(TEXT_LEN),
                 "--text-dim", str(TEXT_DIM), "--resolution", "32", "--batch", "8"])
  assert rc == 0
  return str(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(converted VAE, one-shape latent folder of 16 world records)."""
  tmp = tmp_path_factory.mktemp("latents")
  vae = str(tmp / "vae")
  _write_converted_vae(vae)
  return vae, _precompute(world.WorldRecords(16, seed=0, size=(32, 32), max_refs=2), tmp / "lat", vae)


def tiny(folder, *overrides):
  return C.apply_overrides(C.load(TINY), FAST + [f"data.path={folder}"] + list(overrides))


def test_latent_tokens_are_the_vaes_tokens_of_the_images(folders):
  """precompute (vae:PATH) + latent_batch give exactly encode_tokens of the images and the hashed captions."""
  vae_path, folder = folders
  raw = next(iter(make_latent_pipeline(folder, batch_size=4, seed=0, max_refs=2)))
  batch, _ = latent_batch(raw, C.model_config(tiny(folder)))
  graph, state = nnx.split(load_vae(vae_path))
  tokens = jax.jit(lambda state, images: encode_tokens(nnx.merge(graph, state), images))
  for b, index in enumerate(raw["index"]):
    ex = world.example(0, int(index), (32, 32), 2)
    images = np.zeros((3, 32, 32, 3), np.float32)   # one shape, one trace
    images[:1 + len(ex.references)] = np.stack([ex.target, *ex.references]) / 127.5 - 1
    want = np.asarray(tokens(state, images))
    np.testing.assert_allclose(batch["target"][b], want[0], atol=1e-5)
    n = len(ex.references)
    np.testing.assert_allclose(batch["refs"][b, :n], want[1:1 + n], atol=1e-5)
    assert raw["ref_valid"][b].tolist() == [True] * n + [False] * (2 - n) and not batch["refs"][b, n:].any()
    txt = HashedText(TEXT_LEN, TEXT_DIM)([ex.caption]).txt
    np.testing.assert_array_equal(batch["txt"][b], txt[0])
  assert batch["target"].shape == (4, 16, 16) and batch["weight"].tolist() == [1.0] * 4 and "y" not in batch


def test_latent_pipeline_buckets_by_shape_pads_splits_rows_and_resumes(folders, tmp_path):
  vae, _ = folders
  folder = tmp_path / "two"
  encoders = load_encoders(f"vae:{vae}", text_len=TEXT_LEN, text_dim=TEXT_DIM)
  precompute(write_dataset(_TwoSizes(10), tmp_path / "data", max_refs=2), folder, encoders, batch_size=8,
             buckets=[(32, 32), (32, 48)])
  kw = dict(seed=4, max_refs=2, num_threads=1)
  batches = list(make_latent_pipeline(folder, batch_size=4, num_epochs=1, **kw))
  shapes = [b["target_latent"].shape for b in batches]
  assert sorted(shapes) == [(4, 8, 8, 4)] * 2 + [(4, 8, 12, 4)] * 2   # 5 + 5 records -> 2 + 2 padded batches
  for b in batches:   # one shape per batch, each record its own shape
    assert {int(i) % 2 for i in b["index"]} == ({0} if b["target_latent"].shape[2] == 8 else {1})
  valid = sorted(int(i) for b in batches for i, v in zip(b["index"], b["valid"]) if v)
  assert valid == list(range(10))   # every record once, the padding marked
  # Two processes of batch 2 read the rows of the one-process batches of 4.
  halves = [list(make_latent_pipeline(folder, batch_size=2, num_epochs=1, **kw,
                                      shard=grain.sharding.ShardOptions(p, 2))) for p in range(2)]
  for whole, a, b in zip(batches, *halves):
    np.testing.assert_array_equal(whole["index"], np.concatenate([a["index"], b["index"]]))
  # The iterator state restores the identical next batch.
  it = iter(make_latent_pipeline(folder, batch_size=4, **kw))
  next(it)
  state = it.get_state()
  want = next(it)
  again = iter(make_latent_pipeline(folder, batch_size=4, **kw))
  again.set_state(state)
  got = next(again)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_trains_on_latents_learns_and_resumes_bitwise(folders, tmp_path):
  """20 straight steps equal 2 steps, a restart from their checkpoint and 18 more, bitwise; the loss falls."""
  vae, folder = folders
  c = tiny(folder, "train.steps=20", "checkpoint.every=10", "train.schedule=constant")
  loss = resumed_equals_straight(c, tmp_path, first=2)
  assert len(loss) == 20 and np.all(np.isfinite(loss))
  assert np.mean(loss[-5:]) < np.mean(loss[:5]), loss
  # The run records the precompute folder's encoders (its VAE folder, the stand-in text), and they rebuild.
  from sparse_context_jax.encoders import records
  record = json.loads((tmp_path / "a" / "encoders.json").read_text())
  assert record == {"image": {"kind": "vae", "path": os.path.abspath(vae)},
                    "text": {"kind": "hashed-text", "length": TEXT_LEN, "dim": TEXT_DIM, "pooled_dim": 0}}
  assert records.image_encoder(record["image"]).token_channels == 16
  assert records.text_encoder(record["text"])(["a b"]).txt.shape == (1, TEXT_LEN, TEXT_DIM)


@pytest.mark.parametrize("override, message", [
    ("data.path=", "data.encoder='latents' needs data.path"),
    ("data.path={world}", "is not a latent folder"),
    ("model.arch.in_channels=12", "4 channels pack into 16-channel tokens, but the model's in_channels is 12"),
    ("model.arch.context_dim=32", "expected (T, 32) (the model's context_dim)"),
    ("data.max_refs=1", "has 2 reference slots per example, more than data.max_refs=1"),
])
def test_latent_folder_that_does_not_fit_is_one_line_before_any_compile(folders, override, message, tmp_path,
                                                                         capsys):
  _, folder = folders
  world_dir = write_dataset(world.WorldRecords(2, seed=0, size=(32, 32)), tmp_path / "world")
  args = ["train", "--config", TINY, "--workdir", str(tmp_path / "run")]
  args += [f"--config.{o}" for o in FAST + [f"data.path={folder}", override.format(world=world_dir)]]
  rc = cli.main(args)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
  assert not (tmp_path / "run").exists()
