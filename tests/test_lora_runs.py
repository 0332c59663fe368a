"""A LoRA training run as a source of weights (convert/run.py): its base with its LoRA (or the LoRA's EMA) merged for
`read_run`, `load_model(RUN_DIR)`, `export RUN_DIR` and `generate --model RUN_DIR`; `export RUN_DIR --lora` writes
the LoRA alone. A tiny local-mode run, LoRA on every kind of target (stacked blocks and unstacked modulations)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from sparse_context_jax import cli
from sparse_context_jax import lora as lora_lib
from sparse_context_jax.convert import load_model
from sparse_context_jax.convert.run import open_run, read_lora, read_run
from sparse_context_jax.convert.lora_out import export_lora
from sparse_context_jax.train import config as C
from test_runs import RUN, TINY, assert_bitwise, leaves

LORA = RUN + ["lora.rank=4", "lora.alpha=8.0"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A 4-step tiny LoRA run with EMA, saved at steps 2 and 4: (run dir, its config, the final train state)."""
  from sparse_context_jax.train.loop import train
  workdir = str(tmp_path_factory.mktemp("runs") / "lora")
  config = C.apply_overrides(C.load(TINY), LORA)
  config.lora.targets = lora_lib.DEFAULT_TARGETS + lora_lib.MLP_TARGETS + lora_lib.MODULATION_TARGETS
  return workdir, config, jax.device_get(train(config, workdir))


def merged(state: dict, config, factors: str = "lora") -> dict:
  return jax.device_get(jax.jit(lambda p, f: lora_lib.merge_lora(p, f, config.lora))(state["params"],
                                                                                      state[factors]))


def test_read_run_of_a_lora_run_is_its_base_with_its_lora_merged(lora_run):
  workdir, config, final = lora_run
  assert set(final) == {"params", "lora", "opt", "ema", "rng", "step"}
  run = read_run(workdir)
  assert run.info.lora and run.step == 4
  assert_bitwise(run.params, merged(final, config))
  assert_bitwise(read_run(workdir, ema=True).params, merged(final, config, "ema"))
  assert_bitwise(nnx.to_pure_dict(nnx.state(load_model(workdir, ema=True), nnx.Param)), merged(final, config, "ema"))
  assert_bitwise(read_lora(open_run(workdir)), final["lora"])
  assert_bitwise(read_lora(open_run(workdir, ema=True)), final["ema"])
  # The merge changed every targeted kernel (B trained away from zero), the stacked and the unstacked ones, and
  # nothing else; the EMA of the LoRA is other factors than the LoRA.
  got, base = leaves(run.params), leaves(final["params"])
  changed = {k for k in base if not np.array_equal(got[k], base[k])}
  want = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(final["lora"])}
  assert {k.rsplit("[", 1)[0] for k in changed} == want and all(k.endswith("['kernel']") for k in changed)
  assert any("double_blocks" in k for k in changed) and any(k.startswith("['double_mod_img']") for k in changed)
  assert not np.array_equal(leaves(final["ema"])["['double_blocks']['img_attn']['qkv']['lora_b']"],
                            leaves(final["lora"])["['double_blocks']['img_attn']['qkv']['lora_b']"])


def test_export_of_a_lora_run_converts_back_to_the_merged_parameters(lora_run, tmp_path, capsys):
  """`export RUN_DIR` of a LoRA run -> `convert` -> bitwise its merged parameters (fp32), BFL and diffusers."""
  from sparse_context_jax.convert import load, read_config
  from test_runs import saved_state
  workdir, config, final = lora_run
  cfg = C.model_config(config)
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers()))   # tiny sizes a BFL file cannot tell
  for layout, flags, want in (("bfl", ["--ema"], merged(final, config, "ema")),
                              ("diffusers", ["--step", "2"], merged(saved_state(workdir, config, 2), config))):
    out, converted = tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}-converted"
    assert cli.main(["export", workdir, str(out), "--layout", layout, *flags]) == 0
    assert cli.main(["convert", str(out), str(converted), "--config", str(tmp_path / "config.json")]) == 0
    assert read_config(converted) == cfg
    assert_bitwise(nnx.to_pure_dict(nnx.state(load(converted), nnx.Param)), want)
  capsys.readouterr()


def test_export_lora_writes_the_runs_lora_alone(lora_run, tmp_path, capsys):
  """`export RUN_DIR --lora`: the file `export_lora` writes of the state's LoRA (diffusers by default; --layout bfl,
  --ema the EMA's), with the peft rank and alpha in its metadata."""
  workdir, config, final = lora_run
  cfg = C.model_config(config)
  for flags, layout, factors in (([], "diffusers", final["lora"]), (["--layout", "bfl", "--ema"], "bfl", final["ema"])):
    out, want = tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}-want.safetensors"
    assert cli.main(["export", workdir, str(out), "--lora", *flags]) == 0
    assert f"wrote {out} (LoRA, {layout} layout)" in capsys.readouterr().out
    export_lora(factors, config.lora, cfg, want, layout)
    got, expected = load_file(out), load_file(want)
    assert got.keys() == expected.keys() and len(got) > 0
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    with safe_open(out, "np") as f:
      meta = f.metadata()
    assert json.loads(meta["sparse_context_jax.lora"])["rank"] == 4
    assert json.loads(meta["sparse_context_jax.lora"])["alpha"] == 8.0
    if layout == "diffusers":
      peft = json.loads(meta["lora_adapter_metadata"])
      assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 8.0
      assert all(k.startswith("transformer.") and ".lora_" in k for k in got)
  # --step 2 gives that step's factors.
  assert cli.main(["export", workdir, str(tmp_path / "at2.safetensors"), "--lora", "--step", "2"]) == 0
  at2, at4 = load_file(tmp_path / "at2.safetensors"), load_file(tmp_path / "diffusers.safetensors")
  assert at2.keys() == at4.keys() and all(not np.array_equal(at2[k], at4[k]) for k in at4 if ".lora_B." in k)


def test_generate_from_a_lora_run_writes_pngs(lora_run, tmp_path):
  from PIL import Image
  workdir = lora_run[0]
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text(json.dumps({"prompt": "a red square on the left", "references": ["ref.png"], "task": "composition",
                              "keep": 0.5, "size": [64, 64], "steps": 2, "output": "out/a.png"}) + "\n")
  assert cli.main(["generate", str(jobs), "--model", workdir, "--ema", "--save-latents"]) == 0
  png = np.asarray(Image.open(tmp_path / "out" / "a.png"))
  assert png.shape == (8, 8, 3) and png.dtype == np.uint8
  assert np.all(np.isfinite(np.load(tmp_path / "out" / "a.npy")))
  report = json.loads((tmp_path / "jobs.report.json").read_text())
  assert report["run"] == {"path": workdir, "step": 4, "ema": True} and len(report["jobs"]) == 1


def test_export_lora_of_what_holds_no_lora_is_a_one_line_error(lora_run, tmp_path, capsys):
  """--lora on a converted checkpoint (the LoRA run's merged model exported and converted), export without
  --layout, a bad layout or step with --lora: one line, no file (--lora on a full run: tests/test_runs.py)."""
  workdir, config, _ = lora_run
  cfg = C.model_config(config)
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers()))
  assert cli.main(["export", workdir, str(tmp_path / "full.safetensors"), "--layout", "diffusers"]) == 0
  assert cli.main(["convert", str(tmp_path / "full.safetensors"), str(tmp_path / "converted"),
                   "--config", str(tmp_path / "config.json")]) == 0
  capsys.readouterr()
  cases = [
      (["export", str(tmp_path / "converted"), "{out}", "--lora"], "is not a training run: --lora exports the LoRA"),
      (["export", workdir, "{out}"], "--layout bfl|diffusers is required"),
      (["export", workdir, "{out}", "--lora", "--layout", "sd3"], "invalid choice: 'sd3'"),
      (["export", workdir, "{out}", "--lora", "--step", "3"], "has no step 3 (its saved steps: 2, 4)"),
  ]
  for argv, message in cases:
    rc = cli.main([a.format(out=tmp_path / "x.safetensors") for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err, (argv, err)
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_read_lora_run_onto_a_mesh_keeps_the_train_shardings(lora_run):
  """On a (2, 2, 2) mesh of 8 fake CPU devices, the base and the LoRA are read into their train shardings and merged
  there: each merged parameter has the base's sharding and the merged values."""
  from test_runs import read_on_mesh
  workdir, config, final = lora_run
  out = read_on_mesh(workdir, LORA)
  want = leaves(merged(final, config, "ema"))
  assert out.keys() == want.keys()
  for k, r in out.items():   # merged on 8 devices (their own dot kernels): equal to float32 rounding
    np.testing.assert_allclose(np.asarray(r["value"], np.float32), want[k], rtol=1e-6, atol=1e-7, err_msg=k)
