"""Every command on a table of bad inputs: each ends with its documented exit status and one line on stderr naming
the input; generate still writes the good jobs' PNGs and a report listing the bad lines; nothing is half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparse_context_jax import cli, preset
from sparse_context_jax.model.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
MODEL = preset("flux2-klein-4b").replace(num_heads=2, head_dim=16, axes_dims=(4, 4, 4, 4), depth_double=1,
                                         depth_single=1, context_dim=48, in_channels=32, out_channels=32)
VAE = VAEConfig(family="flux2", block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=8,
                norm_num_groups=4, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=1.0, shift_factor=0.0)


def _one_line(capsys, rc, status=2) -> str:
  err = capsys.readouterr().err.strip()
  assert rc == status, err
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
  return err


# ---- generate: bad job lines beside good ones ------------------------------------------------------------------
@pytest.fixture
def world(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "model.json").write_text(MODEL.to_json())
  (tmp_path / "vae.json").write_text(json.dumps({"kind": "vae", **VAE.to_dict()}))
  Image.fromarray(rng.integers(0, 256, (48, 80, 3), np.uint8)).save(tmp_path / "ref.png")
  Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(tmp_path / "small_mask.png")
  Image.fromarray(rng.integers(0, 256, (48, 80), np.uint8)).save(tmp_path / "mask.png")
  Image.fromarray(rng.integers(0, 256, (1, 1, 3), np.uint8)).save(tmp_path / "tiny.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  np.savez(tmp_path / "p.npz", txt=rng.standard_normal((5, 48)).astype(np.float32))
  np.savez(tmp_path / "nan.npz", txt=np.full((5, 48), np.nan, np.float32))
  np.savez(tmp_path / "wide.npz", txt=np.zeros((5, 47), np.float32))
  (tmp_path / "folder.png").mkdir()
  return tmp_path


GOOD = {"prompt_embeds": "p.npz", "references": ["ref.png"], "size": [32, 32], "steps": 1, "keep": 0.5,
        "strategy": "grid"}
BAD_JOBS = [   # (changes to a good job, what the error line says)
    ({"size": [100000, 100000]}, "at most 4 (the FLUX.2 pipelines' limit)"),
    ({"output": "/proc/nowrite/x.png"}, "/proc/nowrite/x.png: its folder cannot be written"),
    ({"masks": ["small_mask.png"]}, "mask 0 "),
    ({"size": [60, 64]}, "size=[60, 64] must be [H, W], positive multiples of 16"),
    ({"references": ["missing.png"]}, "missing.png"),
    ({"references": ["broken.png"]}, "broken.png"),
    ({"references": ["folder.png"]}, "folder.png"),
    ({"references": ["ref.png"] * 5}, "1 to 4 image paths"),
    ({"references": []}, "1 to 4 image paths"),
    ({"keep": 1.5}, "keep=1.5 is outside"),
    ({"keep": 0.5, "tau": 0.5}, "give keep or tau, not both"),
    ({"strategy": "magic"}, "strategy 'magic' unknown"),
    ({"strategy": "mask"}, "needs a mask for every reference"),
    ({"prompt_embeds": "nan.npz"}, "hold NaN or infinite values"),
    ({"prompt_embeds": "wide.npz"}, "needs txt of shape (T, 48)"),
    ({"prompt_embeds": "missing.npz"}, "cannot read embeddings"),
    ({"prompt": "p.npz", "prompt_embeds": None}, "names an embeddings file: give it as \"prompt_embeds\""),
    ({"prompt": 3, "prompt_embeds": None}, "prompt must be a string"),
    ({"prompt": "a cat"}, "give \"prompt\" (text) or \"prompt_embeds\""),
    ({"guidance": 3.5}, "no guidance embedder"),
    ({"cfg": 4.0}, "cfg needs a negative prompt"),
    ({"steps": 0}, "steps=0 is outside"),
    ({"colour": "red"}, "unknown field(s) ['colour']"),
    ({"output": "folder.png"}, "is a folder"),
    ({"output": "out/0.png"}, "is also the output of line 1"),
    ({"prompt": "a cat", "prompt_embeds": None}, "the prompt is text, but no text encoder was given"),
]


def test_generate_reports_every_bad_line_and_runs_the_good_jobs(world, capsys):
  lines = [json.dumps({**GOOD, "output": "out/0.png"})]
  for i, (change, _) in enumerate(BAD_JOBS):
    job = {**GOOD, "output": f"out/bad{i}.png", **change}
    lines.append(json.dumps({k: v for k, v in job.items() if v is not None}))
  lines += ["{not json", "[1, 2]", json.dumps({**GOOD, "output": "out/1.png"}), ""]
  (world / "jobs.jsonl").write_text("\n".join(lines) + "\n")
  rc = cli.main(["generate", str(world / "jobs.jsonl"), "--random-model", str(world / "model.json"),
                 "--random-vae", str(world / "vae.json"), "--batch-size", "2"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1
  by_line = {int(e.split(":")[1]): e for e in err}
  expected = [(i + 2, message) for i, (_, message) in enumerate(BAD_JOBS)]
  expected += [(len(BAD_JOBS) + 2, "not valid JSON"), (len(BAD_JOBS) + 3, "a job must be a JSON object")]
  assert sorted(by_line) == [line for line, _ in expected], err
  for line, message in expected:
    assert message in by_line[line], (line, by_line[line])
  report = json.loads((world / "jobs.report.json").read_text())
  assert [b["line"] for b in report["bad_jobs"]] == [line for line, _ in expected]
  assert sorted(Path(j["output"]).name for j in report["jobs"]) == ["0.png", "1.png"]
  assert sorted(os.listdir(world / "out")) == ["0.png", "1.png"]   # no bad job's PNG, nothing half-written


def test_a_job_that_fails_when_its_png_is_written_is_reported_and_the_others_run(world, capsys, monkeypatch):
  from sparse_context_jax.commands import generate
  lines = [json.dumps({**GOOD, "output": f"out/{i}.png"}) for i in range(3)]
  (world / "jobs.jsonl").write_text("\n".join(lines) + "\n")
  write = generate._write

  def disk_full_for_one(path, data):
    if path.name == "1.png":
      raise OSError(28, "No space left on device")
    write(path, data)

  monkeypatch.setattr(generate, "_write", disk_full_for_one)
  rc = cli.main(["generate", str(world / "jobs.jsonl"), "--random-model", str(world / "model.json"),
                 "--random-vae", str(world / "vae.json"), "--batch-size", "2"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1 and "jobs.jsonl:2: failed: cannot write" in err[0] and "No space left" in err[0]
  report = json.loads((world / "jobs.report.json").read_text())
  assert [f["line"] for f in report["failed_jobs"]] == [2] and len(report["jobs"]) == 2
  assert sorted(os.listdir(world / "out")) == ["0.png", "2.png"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "none.jsonl", "jobs file"),
    (lambda d: (d / "dir.jsonl").mkdir() or d / "dir.jsonl", "is not a file"),
    (lambda d: (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n') and d / "latin1.jsonl", "is not UTF-8"),
])
def test_generate_jobs_file_errors_are_one_line_before_any_model(world, make, message, capsys):
  rc = cli.main(["generate", str(make(world)), "--random-model", "flux2-klein-9b", "--random-vae", "flux2"])
  assert message in _one_line(capsys, rc)


def test_generate_empty_jobs_file_builds_nothing_and_writes_an_empty_report(world, capsys):
  (world / "empty.jsonl").write_text("\n\n")
  rc = cli.main(["generate", str(world / "empty.jsonl"), "--random-model", "flux2-klein-9b", "--random-vae", "flux2"])
  assert rc == 0   # no job, no failure; a 9B model would take minutes: it is never built
  report = json.loads((world / "empty.report.json").read_text())
  assert report["jobs"] == [] and report["bad_jobs"] == []


# ---- train, build-dataset, precompute, convert, export ---------------------------------------------------------
def _train(tmp, *overrides):
  return ["train", "--config", TINY, "--workdir", str(tmp / "run")] + [f"--config.{o}" for o in overrides]


@pytest.mark.parametrize("argv, message, absent", [
    (lambda t: _train(t, "data.path=" + str(t / "nope")), "data.path=", "run"),
    (lambda t: ["train", "--config", TINY + ":flux3", "--workdir", str(t / "run")], "flux3", "run"),
    (lambda t: ["train", "--config", str(t / "no.py"), "--workdir", str(t / "run")], "not found", "run"),
    (lambda t: _train(t, "train.batch_size=6", "train.grad_accum=4"), "train.batch_size=6", "run"),
    (lambda t: _train(t, "model.dtype=float16"), "model.dtype='float16'", "run"),
    (lambda t: _train(t, "data.encoder=latents"), "needs data.path", "run"),
    (lambda t: ["train", "--config", TINY], "--workdir", "run"),
    (lambda t: ["build-dataset", str(t / "ds"), "--manifest", str(t / "none.jsonl")], "none.jsonl", "ds"),
    (lambda t: ["build-dataset", str(t / "ds"), "--synthetic", "0"], "--synthetic 0", "ds"),
    (lambda t: ["build-dataset", str(t / "ds"), "--synthetic", "4", "--max-refs", "9"], "--max-refs 9", "ds"),
    (lambda t: ["precompute", str(t / "nodata"), str(t / "lat"), "--encoders", "vae:x"], "nodata", "lat"),
    (lambda t: ["precompute", str(t), str(t / "lat")], "needs --encoders", "lat"),
    (lambda t: ["precompute", str(t), str(t / "lat"), "--encoders", "vae:x", "--resolution", "17"],
     "--resolution 17", "lat"),
    (lambda t: ["convert", str(t / "none.safetensors"), str(t / "out")], "none.safetensors", "out"),
    (lambda t: ["convert", str(t / "junk.safetensors"), str(t / "out")], "junk.safetensors", "out"),
    (lambda t: ["convert", str(t), str(t / "out"), "--dtype", "int8"], "--dtype", "out"),
    (lambda t: ["export", str(t / "nockpt"), str(t / "x.safetensors"), "--layout", "bfl"], "nockpt",
     "x.safetensors"),
    (lambda t: ["export", str(t), str(t / "x.safetensors"), "--layout", "sd3"], "--layout", "x.safetensors"),
])
def test_other_commands_on_bad_inputs(tmp_path, argv, message, absent, capsys):
  (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
  rc = cli.main(argv(tmp_path))
  assert message in _one_line(capsys, rc)
  assert not (tmp_path / absent).exists()
