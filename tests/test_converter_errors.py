"""Bad input to convert / export: one clear error naming the file, keys or shapes; nothing left at OUT."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import reference as ref
from conftest import torch_model
from sparse_context_jax.convert import CheckpointError, convert_checkpoint, export_checkpoint
from sparse_context_jax.convert.output import OutputExistsError
from sparse_context_jax.convert.safetensors_io import SafetensorsFile, save_file

NAME = "flux2-klein-2ref"  # hidden 32: proj_out.weight is (32, 32)


def fake_vae() -> dict[str, np.ndarray]:
  """A few BFL VAE tensors (flux_arch.md section 4.3), tiny shapes."""
  z = lambda *s: np.zeros(s, np.float32)
  return {"encoder.conv_in.weight": z(8, 3, 3, 3), "encoder.conv_in.bias": z(8),
          "encoder.down.0.block.0.norm1.weight": z(8), "encoder.down.0.block.0.conv1.weight": z(8, 8, 3, 3),
          "encoder.mid.attn_1.q.weight": z(8, 8, 1, 1), "encoder.norm_out.weight": z(8),
          "decoder.conv_in.weight": z(8, 4, 3, 3), "decoder.up.0.block.0.conv1.weight": z(8, 8, 3, 3),
          "decoder.conv_out.weight": z(3, 8, 3, 3)}


def variants(sd: dict) -> dict[str, tuple[dict, str]]:
  """name -> (tensors, regex the error must match)."""
  missing = dict(sd)
  del missing["transformer_blocks.1.attn.to_k.weight"]
  wrong_dtype = {**sd, "proj_out.weight": sd["proj_out.weight"].astype(np.int64)}
  sd3_like = {"pos_embed.proj.weight": np.zeros((4, 4), np.float32),
              "joint_blocks.0.x_block.attn.qkv.weight": np.zeros((12, 4), np.float32)}
  return {
      "missing": (missing, r"missing 1 tensor\(s\): transformer_blocks\.1\.attn\.to_k\.weight"),
      "unexpected": ({**sd, "pos_embed.freqs": np.zeros(3, np.float32)}, r"unexpected 1 tensor\(s\): pos_embed\.freqs"),
      "shape": ({**sd, "proj_out.weight": np.zeros((31, 32), np.float32)},
                r"wrong shapes: proj_out\.weight \(31, 32\) \(expected \(32, 32\)\)"),
      "dtype": (wrong_dtype, r"non-float dtype: proj_out\.weight I64"),
      "vae": (fake_vae(), r"no released-style VAE fits its names and shapes .*; pass --config"),
      "other model": (sd3_like, r"is not a FLUX transformer: neither img_in\.weight .* pos_embed\.proj\.weight"),
      "flux1 as flux2": (ref.state_dict(torch_model("flux1-kontext")), r"missing \d+ tensor\(s\): .*single_stream"),
  }


def assert_nothing_left(out) -> None:
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype", "vae", "other model", "flux1 as flux2"])
def test_bad_tensors_are_named(case, tmp_path):
  tm = torch_model(NAME)
  tensors, message = variants(ref.state_dict(tm))[case]
  src = tmp_path / "model.safetensors"
  save_file(tensors, src)
  (tmp_path / "config.json").write_text(json.dumps(dict(tm.config)))
  config = None if case in ("vae", "other model") else str(tmp_path / "config.json")
  with pytest.raises(CheckpointError, match=message) as e:
    convert_checkpoint(src, tmp_path / "out", config=config)
  assert str(src) in str(e.value) and "\n" not in str(e.value)
  assert_nothing_left(tmp_path / "out")


def _valid_file(tmp_path):
  src = tmp_path / "model.safetensors"
  save_file(ref.state_dict(torch_model(NAME)), src)
  return src


def test_unreadable_files_are_named(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(CheckpointError, match=f"{tmp_path}/nope does not exist"):
    convert_checkpoint(tmp_path / "nope", out)
  src = _valid_file(tmp_path)
  size = src.stat().st_size
  with open(src, "r+b") as f:
    f.truncate(size - 10)
  with pytest.raises(CheckpointError, match=rf"{src} is truncated: tensor '[^']+' ends at byte \d+ but the file "
                                            rf"has {size - 10} bytes"):
    convert_checkpoint(src, out)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(CheckpointError, match=f"{garbage} is not a valid safetensors file: header length"):
    convert_checkpoint(garbage, out)
  garbage.write_bytes(np.uint64(9).tobytes() + b"{not json" + b"\0" * 16)
  with pytest.raises(CheckpointError, match=f"{garbage} is not a valid safetensors file: header is not JSON"):
    convert_checkpoint(garbage, out)
  assert_nothing_left(out)


def test_vae_config_and_bad_index_are_named(tmp_path):
  folder = tmp_path / "vae"
  folder.mkdir()
  save_file(fake_vae(), folder / "diffusion_pytorch_model.safetensors")
  (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLFlux2"}))
  with pytest.raises(CheckpointError, match="VAE state dict does not match the config: missing"):
    convert_checkpoint(folder, tmp_path / "out")
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"x_embedder.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
  with pytest.raises(CheckpointError, match="shard file\\(s\\) that do not exist: "
                                            "diffusion_pytorch_model-00001-of-00002.safetensors"):
    convert_checkpoint(sharded, tmp_path / "out")
  assert_nothing_left(tmp_path / "out")


def test_existing_output_is_refused_then_replaced_only_with_force(tmp_path):
  src = _valid_file(tmp_path)
  tm = torch_model(NAME)
  (tmp_path / "config.json").write_text(json.dumps(dict(tm.config)))
  config = str(tmp_path / "config.json")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(OutputExistsError, match=f"{out} exists and is a non-empty directory \\(pass --force"):
    convert_checkpoint(src, out, config=config)
  assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
  convert_checkpoint(src, out, config=config, force=True)
  assert not (out / "keep.txt").exists() and (out / "config.json").exists()
  (tmp_path / "back.safetensors").write_text("mine")
  with pytest.raises(OutputExistsError, match="back.safetensors exists and is a non-empty file"):
    export_checkpoint(out, tmp_path / "back.safetensors", layout="bfl")
  assert (tmp_path / "back.safetensors").read_text() == "mine"
  with pytest.raises(CheckpointError, match=f"{src} is not a converted checkpoint"):
    export_checkpoint(src, tmp_path / "x.safetensors", layout="bfl")


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch):
  src = _valid_file(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(torch_model(NAME).config)))
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  reads = []

  def failing_read(self, key, *buffer):
    reads.append(key)
    if len(reads) > 20:  # after the first groups were written
      raise OSError("disk on fire")
    return original(self, key, *buffer)

  original = SafetensorsFile.read
  monkeypatch.setattr(SafetensorsFile, "read", failing_read)
  with pytest.raises(OSError, match="disk on fire"):
    convert_checkpoint(src, out, config=str(tmp_path / "config.json"), force=True)
  assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
  with pytest.raises(OSError):
    convert_checkpoint(src, tmp_path / "new", config=str(tmp_path / "config.json"))
  assert_nothing_left(tmp_path / "new")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "sparse_context_jax", *args], capture_output=True, text=True,
                        timeout=300)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
  src = _valid_file(tmp_path)
  with open(src, "r+b") as f:
    f.truncate(src.stat().st_size - 1)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  cases = [(("convert", str(tmp_path / "nope"), str(tmp_path / "out")), f"{tmp_path}/nope does not exist"),
           (("convert", str(src), str(tmp_path / "out")), f"{src} is truncated: tensor"),
           (("convert", str(src), str(tmp_path / "full")), f"{tmp_path}/full exists and is a non-empty directory"),
           (("export", str(tmp_path / "full"), str(tmp_path / "o.safetensors"), "--layout", "bfl"),
            f"{tmp_path}/full is not a converted checkpoint")]
  for args, message in cases:
    r = _cli(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert r.stderr.startswith(f"error: {message}") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
  assert not (tmp_path / "out").exists() and not (tmp_path / "o.safetensors").exists()
  assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
