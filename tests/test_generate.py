"""`generate`: compile once per shape, bad jobs by line, sharded equals single-device, batch-mate independence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparse_context_jax import preset
from sparse_context_jax.model.vae import VAEConfig

MODEL = preset("flux2-klein-4b").replace(num_heads=2, head_dim=16, axes_dims=(4, 4, 4, 4), depth_double=1,
                                         depth_single=1, context_dim=48, in_channels=32, out_channels=32)
VAE = VAEConfig(family="flux2", block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=8,
                norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=1.0, shift_factor=0.0)
ROOT = Path(__file__).resolve().parents[1]


def _world(tmp: Path, n_jobs: int, **job) -> Path:
  rng = np.random.default_rng(0)
  (tmp / "model.json").write_text(MODEL.to_json())
  (tmp / "vae.json").write_text(json.dumps({"kind": "vae", **VAE.to_dict()}))
  lines = []
  for i in range(n_jobs):
    refs = []
    for r in range(2):
      path = tmp / f"ref{i}_{r}.png"
      Image.fromarray(rng.integers(0, 256, (48 + 16 * r, 80, 3), np.uint8)).save(path)   # odd sizes: resized
      refs.append(path.name)
    np.savez(tmp / f"p{i}.npz", txt=rng.standard_normal((5, 48)).astype(np.float32),
             neg_txt=rng.standard_normal((5, 48)).astype(np.float32))
    lines.append({"prompt_embeds": f"p{i}.npz", "references": refs, "size": [64, 64], "steps": 2, "seed": i,
                  "strategy": "grid", "keep": 0.5, "output": f"out/{i}.png", **job})
  (tmp / "jobs.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  return tmp / "jobs.jsonl"


def _generate(jobs: Path, *extra, devices: int = 1, batch: int = 2):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", "generate", str(jobs), "--random-model",
                         str(jobs.parent / "model.json"), "--random-vae", str(jobs.parent / "vae.json"),
                         "--batch-size", str(batch), "--save-latents", *extra],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_jobs_of_one_shape_compile_one_sampling_program(tmp_path):
  jobs = _world(tmp_path, 5)
  r = _generate(jobs)
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / "jobs.report.json").read_text())
  assert len(report["jobs"]) == 5 and not report["bad_jobs"]
  # 3 batches (2, 2, 1), new prompts, seeds and references: one sampling program and one decode program
  assert sum(p["program"] == "sample" for p in report["programs"]) == 1
  assert sum(p["program"] == "decode" for p in report["programs"]) == 1
  for j in report["jobs"]:
    assert Image.open(j["output"]).size == (64, 64)
    assert j["kept_tokens"] == [8, 8] and j["bucket"] == 0.5 and j["sequence"] == 32
  a, b = (np.load(tmp_path / f"out/{i}.npy") for i in (0, 1))
  assert not np.allclose(a, b)


def test_bad_jobs_are_reported_by_line_and_the_rest_run(tmp_path):
  jobs = _world(tmp_path, 3)
  lines = jobs.read_text().splitlines()
  bad = [json.dumps({**json.loads(lines[0]), "size": [60, 64], "output": "out/x.png"}),
         "{not json",
         json.dumps({**json.loads(lines[0]), "references": ["missing.png"], "output": "out/y.png"}),
         json.dumps({**json.loads(lines[0]), "keep": 1.5, "output": "out/z.png"}),
         json.dumps({**json.loads(lines[0]), "references": ["ref0_0.png"] * 5, "output": "out/w.png"})]
  jobs.write_text("\n".join(lines + bad) + "\n")
  r = _generate(jobs)
  assert r.returncode == 1
  errors = r.stderr.strip().splitlines()
  assert [e.split(":")[1] for e in errors] == ["4", "5", "6", "7", "8"]
  assert "size=[60, 64] must be [H, W], positive multiples of 16" in errors[0]
  assert "not valid JSON" in errors[1] and "file not found" in errors[2]
  assert "keep=1.5 is outside" in errors[3] and "1 to 4 image paths" in errors[4]
  assert all((tmp_path / f"out/{i}.png").exists() for i in range(3))
  before = (tmp_path / "out/0.png").stat().st_mtime_ns
  r = _generate(jobs)   # outputs exist now: refused without --force, untouched
  assert r.returncode == 1 and "exists (pass --force to overwrite)" in r.stderr
  assert (tmp_path / "out/0.png").stat().st_mtime_ns == before


def test_sharded_batch_equals_single_device_and_batch_mates_do_not_matter(tmp_path):
  one, eight = tmp_path / "one", tmp_path / "eight"
  one.mkdir(), eight.mkdir()
  for folder, devices, batch in ((one, 1, 1), (eight, 8, 8)):
    r = _generate(_world(folder, 3, cfg=3.0), devices=devices, batch=batch)
    assert r.returncode == 0, r.stderr
  for i in range(3):
    a, b = np.load(one / f"out/{i}.npy"), np.load(eight / f"out/{i}.npy")
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_missing_jobs_file_is_one_line(tmp_path):
  r = _generate(tmp_path / "nope.jsonl")
  assert r.returncode == 2 and r.stderr.strip().startswith("error: jobs file") and "Traceback" not in r.stderr


def test_a_kv_model_samples_with_the_reference_kv_loop_and_reports_its_cache(tmp_path):
  joint, kv = tmp_path / "joint", tmp_path / "kv"
  for folder, cfg in ((joint, MODEL), (kv, MODEL.replace(reference_attention="kv"))):
    folder.mkdir()
    jobs = _world(folder, 2)
    (folder / "model.json").write_text(cfg.to_json())
    r = _generate(jobs)
    assert r.returncode == 0, r.stderr
  report = json.loads((kv / "jobs.report.json").read_text())
  assert sum(p["program"] == "sample" for p in report["programs"]) == 1
  # k and v of 2 blocks, 16 reference slots (8 + 8 kept), hidden 32, float32
  assert [j["kv_cache_bytes"] for j in report["jobs"]] == [2 * 2 * 16 * 32 * 4] * 2
  assert all(j["kv_cache_bytes"] is None for j in json.loads((joint / "jobs.report.json").read_text())["jobs"])
  for i in range(2):
    a, b = np.load(joint / f"out/{i}.npy"), np.load(kv / f"out/{i}.npy")
    assert np.all(np.isfinite(b)) and not np.allclose(a, b)
