"""The synthetic world and the grain pipeline: ground truth, 2 real processes covering 2,000 records once per epoch,
iterator state resumed to the identical next batch (with and without worker processes), buckets and masks."""

from __future__ import annotations

import json
import subprocess
import sys

import grain
import numpy as np
import pytest

from sparse_context_jax.data import make_pipeline, open_dataset, psnr, world, write_dataset
from sparse_context_jax.data.world import COLOURS, PLACES

SIZE = (32, 32)


@pytest.fixture(scope="module")
def world_2000(tmp_path_factory):
  records = world.WorldRecords(2000, seed=7, size=SIZE)
  return write_dataset(records, tmp_path_factory.mktemp("w") / "world", metadata=records.metadata())


def test_world_is_deterministic_with_exact_ground_truth():
  a, b = world.example(3, 10, (64, 48)), world.example(3, 10, (64, 48))
  assert a.caption == b.caption and all(np.array_equal(x, y) for x, y in zip(a.references, b.references))
  assert world.example(4, 10, (64, 48)).caption != a.caption or not np.array_equal(
      world.example(4, 10, (64, 48)).target, a.target)
  edit = next(world.example(0, i) for i in range(0, 20, 2))
  assert edit.task == "editing" and len(edit.references) == 1
  old, kind, colour = edit.caption.removeprefix("make the ").split()
  inside = edit.masks[0] > 0
  np.testing.assert_array_equal(edit.references[0][inside], np.broadcast_to(COLOURS[old], (inside.sum(), 3)))
  np.testing.assert_array_equal(edit.target[inside], np.broadcast_to(COLOURS[colour], (inside.sum(), 3)))
  np.testing.assert_array_equal(edit.target[~inside], edit.references[0][~inside])   # only the shape changes
  assert psnr(edit.target, edit.references[0]) < 40 and psnr(edit.target, edit.target) == np.inf
  counts = set()
  for i in range(1, 40, 2):
    comp = world.example(0, i)
    counts.add(len(comp.references))
    assert comp.task == "composition" and len(comp.masks) == len(comp.references)
    for j, part in enumerate(comp.caption.split(", ")):
      rest = part.removeprefix("the ").split(" from image ")[1]
      place = rest.split(" at the ")[1]
      ref, mask = comp.references[j], comp.masks[j] > 0
      colour = ref[mask][0]
      assert (ref[mask] == colour).all()     # the subject is one flat colour, exactly its mask
      fy, fx = PLACES[place]
      centre = (int(fy * 64), int(fx * 64))
      assert (comp.target[centre] == colour).all(), comp.caption   # the subject sits at the named place
  assert counts == {1, 2, 3, 4}
  words = [len(world.example(0, i).caption.replace(",", " ").split()) for i in range(40)]
  assert max(words) == world.caption_words(4) == 36   # the 4-reference captions reach the bound, none passes it
  assert world.caption_words(2) == 18 and world.caption_words(4, ("editing",)) == 5


def test_two_processes_read_their_rows_of_one_global_batch_sequence(world_2000):
  """2 processes x batch 16 together give exactly 1 process's batches of 32: the data does not depend on the
  process count, and every record is a valid example once per epoch across the processes."""
  script = ("import json, sys, grain\n"
            "from sparse_context_jax.data import make_pipeline\n"
            "i, n = int(sys.argv[1]), int(sys.argv[2])\n"
            "it = make_pipeline(sys.argv[3], batch_size=32 // n, resolution=32, seed=5, num_epochs=1, num_threads=2,\n"
            "                   shard=grain.sharding.ShardOptions(shard_index=i, shard_count=n))\n"
            "print(json.dumps([[[int(x) for x in b['index']], [bool(v) for v in b['valid']]] for b in it]))\n")
  runs = [(0, 1), (0, 2), (1, 2)]
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i), str(n), str(world_2000)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i, n in runs]
  out = []
  for p in procs:
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  single, first, second = out
  assert len(single) == len(first) == len(second)
  for whole, a, b in zip(single, first, second):
    assert len(a[0]) == len(b[0]) == 16
    assert whole[0] == a[0] + b[0] and whole[1] == a[1] + b[1]
  valid = [x for batch in first + second for x, v in zip(*batch) if v]
  assert len(valid) == len(set(valid)) == 2000 and set(valid) == set(range(2000))
  assert [x for x, v in zip(*first[0]) if v] != sorted(x for x, v in zip(*first[0]) if v)    # shuffled


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_epochs_reshuffle_and_pad_to_fixed_shapes(world_2000):
  ds = open_dataset(world_2000)
  shards = [list(make_pipeline(ds, batch_size=16, resolution=32, seed=1, num_epochs=2, num_threads=2,
                               shard=grain.sharding.ShardOptions(shard_index=i, shard_count=3))) for i in range(3)]
  assert len({len(s) for s in shards}) == 1   # every process steps through the same number of batches
  batches = [{k: np.concatenate([s[j][k] for s in shards]) for k in ("index", "valid", "target")}
             for j in range(len(shards[0]))]
  per_epoch = len(batches) // 2
  assert len(batches) == 2 * per_epoch and per_epoch >= -(-2000 // 48)
  for i, s in enumerate(shards):
    for b in s:
      assert b["target"].shape == (16, 32, 32, 3) and b["references"].shape == (16, 4, 32, 32, 3)
      assert b["masks"].shape == (16, 4, 32, 32)
  epochs = [np.concatenate([b["index"][b["valid"]] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
            for e in range(2)]
  for e in epochs:
    assert len(e) == 2000 and set(e.tolist()) == set(range(2000))
  assert epochs[0].tolist() != epochs[1].tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_continues_with_the_identical_batch(world_2000, workers):
  kw = dict(batch_size=8, resolution=32, seed=3, worker_count=workers, num_threads=2)
  it = iter(make_pipeline(str(world_2000), **kw))
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state(), default=str)) if workers == 0 else it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = iter(make_pipeline(str(world_2000), **kw))
  fresh.set_state(state)
  assert all(_same(next(fresh), e) for e in expected)
  for i in (it, fresh):
    if hasattr(i, "close"):
      i.close()


def test_examples_are_the_world_resized_with_masks(tmp_path):
  records = world.WorldRecords(6, seed=2, size=(48, 64), max_refs=2)
  path = write_dataset(records, tmp_path / "w", max_refs=2, metadata=records.metadata())
  batch = next(iter(make_pipeline(path, batch_size=6, buckets=[(48, 64), (32, 32)], shuffle=False, num_epochs=1,
                                  num_threads=0)))
  assert batch["references"].shape == (6, 2, 48, 64, 3) and batch["valid"].all()
  for b, i in enumerate(batch["index"]):
    ex = world.example(2, int(i), (48, 64), 2)
    np.testing.assert_array_equal(batch["target"][b], ex.target)
    n = len(ex.references)
    assert batch["ref_valid"][b].tolist() == [True] * n + [False] * (2 - n) == batch["mask_valid"][b].tolist()
    assert str(batch["caption"][b]) == ex.caption and batch["task"][b] == world.TASKS.index(ex.task)
    for r in range(n):
      np.testing.assert_array_equal(batch["masks"][b, r], ex.masks[r])
  # Into a square bucket: images and masks are cropped and resized alike (the subject stays under its mask).
  small = next(iter(make_pipeline(path, batch_size=6, buckets=[(32, 32)], shuffle=False, num_epochs=1,
                                  num_threads=0)))
  for b in range(6):
    for r in np.flatnonzero(small["ref_valid"][b]):
      inside = small["masks"][b, r] == 255
      pixels = small["references"][b, r][inside]
      # bicubic ringing moves edge pixels a little; a misaligned mask would take in the ground (~100 away)
      subject = np.median(pixels, axis=0)
      assert inside.any() and np.abs(pixels - subject).max() <= 16
