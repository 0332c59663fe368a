"""Manifests: a good one round-trips through the tfds builder; every kind of bad row is reported by line; a failed
build leaves nothing; --skip-bad skips and counts; the command reports one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sparse_context_jax.data import BadManifest, build_from_manifest, open_dataset
from sparse_context_jax.images import load_image

RNG = np.random.default_rng(1)


@pytest.fixture
def folder(tmp_path):
  """Images of several modes and sizes, plus a corrupt one, in tmp_path/img."""
  d = tmp_path / "img"
  d.mkdir()
  Image.fromarray(RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / "t.png")
  Image.fromarray(RNG.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(d / "r.jpg", quality=90)
  Image.fromarray(RNG.integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA").save(d / "r2.png")
  Image.fromarray(RNG.integers(0, 256, (33, 47), dtype=np.uint16)).save(d / "r16.png")
  Image.fromarray((RNG.random((33, 47)) > 0.5)).save(d / "m.png")
  Image.fromarray((RNG.random((10, 10)) > 0.5)).save(d / "small_mask.png")
  (d / "corrupt.png").write_bytes((d / "t.png").read_bytes()[:200])
  return d


def _row(**kw):
  row = dict(target="img/t.png", references=["img/r.jpg"], caption="make it so", task="editing")
  row.update(kw)
  return {k: v for k, v in row.items() if v is not None}


def _write(tmp_path, rows, name="m.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return path


def test_good_manifest_round_trips(tmp_path, folder):
  manifest = _write(tmp_path, [
      _row(references=["img/r.jpg", "img/r16.png"], masks=["img/m.png", "img/m.png"], task="composition"),
      "",   # blank lines are ignored
      _row(target="img/r2.png", references=["img/t.png"], caption="ünïcode caption"),
  ])
  out, count, bad = build_from_manifest(manifest, tmp_path / "ds")
  assert (count, bad) == (2, [])
  ds = open_dataset(out)
  assert len(ds) == 2 and ds.target_sizes == [(40, 56), (40, 56)] and ds.metadata["skipped_lines"] == []
  src = ds.source()
  first, second = src[0], src[1]
  np.testing.assert_array_equal(first["target"], load_image(folder / "t.png"))
  np.testing.assert_array_equal(first["references"][0], load_image(folder / "r.jpg"))
  np.testing.assert_array_equal(first["references"][1], load_image(folder / "r16.png"))
  assert first["masks"][0].shape == (33, 47, 1) and first["task"] == 1 and first["origin"] == b"m.jsonl:1"
  np.testing.assert_array_equal(second["target"], load_image(folder / "r2.png"))
  assert second["caption"].decode() == "ünïcode caption" and len(second["masks"]) == 0
  assert second["origin"] == b"m.jsonl:3"
  assert "tensorflow" not in sys.modules


# Every kind of bad row, each on its own line after one good row (line 1).
BAD_ROWS = [
    ("not json {", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    (_row(target=None), "missing key(s) ['target']"),
    (_row(extra=1), "unknown key(s) ['extra']"),
    (_row(target="img/nope.png"), "nope.png': file not found"),
    (_row(target="img/corrupt.png"), "corrupt.png': unreadable image"),
    (_row(references=[]), "no reference"),
    (_row(references=["img/r.jpg"] * 5), "5 references, more than the maximum 4"),
    (_row(task="inpainting"), "unknown task 'inpainting'"),
    (_row(references=["img/r.jpg", "img/corrupt.png"]), "reference 2 '"),
    (_row(masks=["img/small_mask.png"]), "small_mask.png' is 10x10 (HxW), its reference is 33x47"),
    (_row(masks=["img/m.png", "img/m.png"]), "2 masks for 1 references"),
    (_row(masks=["img/corrupt.png"]), "mask 1 '"),
    (_row(caption=3), "caption must be a string"),
]


def test_every_bad_row_is_reported_by_line_and_nothing_is_left(tmp_path, folder):
  manifest = _write(tmp_path, [_row()] + [row for row, _ in BAD_ROWS])
  out = tmp_path / "ds"
  with pytest.raises(BadManifest) as info:
    build_from_manifest(manifest, out)
  bad = info.value.bad
  assert [b.line for b in bad] == list(range(2, 2 + len(BAD_ROWS)))
  for b, (_, message) in zip(bad, BAD_ROWS):
    assert message in b.reason, (b.line, b.reason, message)
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["img", "m.jsonl"]


def test_skip_bad_writes_the_good_rows_and_counts_the_rest(tmp_path, folder):
  manifest = _write(tmp_path, [_row(), _row(task="x"), _row(caption="second good"), _row(target="img/corrupt.png")])
  out, count, bad = build_from_manifest(manifest, tmp_path / "ds", skip_bad=True)
  assert count == 2 and [b.line for b in bad] == [2, 4]
  ds = open_dataset(out)
  assert ds.metadata["skipped_lines"] == [2, 4] and ds.source()[1]["caption"] == b"second good"


def test_failure_while_writing_leaves_nothing(tmp_path, folder):
  # The file passes validation, then breaks before it is written: the build fails and leaves no folder.
  from sparse_context_jax.data import builder
  manifest = _write(tmp_path, [_row(), _row(references=["img/r2.png"])])
  rows, _ = builder.read_manifest(manifest)
  (folder / "r2.png").write_bytes(b"broken after validation")
  with pytest.raises(Exception, match="unreadable image"):
    builder.write_dataset(builder.ManifestRecords(rows, manifest), tmp_path / "ds")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "m.jsonl"]


def test_non_empty_out_is_refused_unless_forced(tmp_path, folder):
  manifest = _write(tmp_path, [_row()])
  (tmp_path / "ds").mkdir()
  (tmp_path / "ds" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    build_from_manifest(manifest, tmp_path / "ds")
  assert (tmp_path / "ds" / "keep.txt").exists()
  build_from_manifest(manifest, tmp_path / "ds", force=True)
  assert len(open_dataset(tmp_path / "ds")) == 1 and not (tmp_path / "ds" / "keep.txt").exists()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", *map(str, args)], capture_output=True,
                        text=True, timeout=120)


def test_command_reports_bad_rows_in_one_line_and_skips_on_request(tmp_path, folder):
  manifest = _write(tmp_path, [_row(), _row(references=[]), _row(task="x")])
  r = _cli("build-dataset", tmp_path / "ds", "--manifest", manifest)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "error: 2 bad row(s) of 3: line 2: no reference (expected 1 to 4); "
      "line 3: unknown task 'x' (expected one of ['editing', 'composition'])")
  assert not (tmp_path / "ds").exists()
  r = _cli("build-dataset", tmp_path / "ds", "--manifest", manifest, "--skip-bad")
  assert r.returncode == 0, r.stderr
  assert "skipped line 2: no reference" in r.stdout and "wrote 1 records" in r.stdout
  assert "(2 bad rows skipped)" in r.stdout
