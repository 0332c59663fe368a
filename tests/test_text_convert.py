"""`convert` of transformers text-encoder folders (save_pretrained, single and index-sharded safetensors, with their
tokenizer beside them or in a pipeline's sibling folder) -> `load_text_encoder` equals transformers; strict errors
leave nothing behind; unread tensors are skipped with a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import text_reference as ref
from sparse_context_jax import load_text_encoder
from sparse_context_jax.cli import main
from sparse_context_jax.convert import CheckpointError, convert_checkpoint, load_model


def save_tokenizer(folder, size: int = ref.VOCAB - 10) -> None:
  vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(folder))


def save_model(name: str, folder, *, tokenizer: bool = True, **kw) -> None:
  ref.torch_model(name).save_pretrained(str(folder), **kw)
  if tokenizer:
    save_tokenizer(folder)


def _expected(name, ids, mask):
  tm = ref.torch_model(name)
  with torch.no_grad():
    out = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
  return out


@pytest.mark.parametrize("name,shard", [("qwen3-causal-lm", None), ("mistral3", "20KB"), ("qwen3-model", "10KB")])
def test_convert_decoder_and_load_equals_transformers(tmp_path, capsys, name, shard):
  src, out = tmp_path / "src", tmp_path / "out"
  save_model(name, src, **({} if shard is None else {"max_shard_size": shard}))
  if shard:
    assert list(src.glob("*.safetensors.index.json"))
  convert_checkpoint(src, out)
  note = capsys.readouterr().err
  if name == "qwen3-causal-lm":
    assert "skipped 1 tensor(s) never read (the LM head): lm_head.weight" in note
  if name == "mistral3":
    assert "never read (the vision tower and projector): multi_modal_projector." in note
  model = load_text_encoder(out)
  ids, mask = ref.prompts((10, 6, 3), 10, seed=40)
  expected = _expected(name, ids, mask).hidden_states
  got = model(jnp.asarray(ids), jnp.asarray(mask))
  assert max(ref.rel_err(g, e.numpy()) for g, e in zip(got, expected)) <= 1e-5
  assert (out / "tokenizer" / "tokenizer.json").is_file() and not (out / "tokenizer" / "config.json").exists()
  assert json.loads((out / "config.json").read_text())["kind"] == "text-decoder"


def test_cli_convert_with_text_layers_keeps_only_those_layers(tmp_path, capsys):
  name = "qwen3-causal-lm"
  src, out = tmp_path / "src", tmp_path / "out"
  save_model(name, src)
  capsys.readouterr()
  assert main(["convert", str(src), str(out), "--text-layers", "2", "--dtype", "bfloat16"]) == 0
  captured = capsys.readouterr()
  assert "2 of 3 layers" in captured.out
  assert "layers 3..3 and the final norm" in captured.err and "model.layers.2." in captured.err
  model = load_text_encoder(out)
  assert model.config.num_layers == 2 and model.final_norm is None and model.layers.q.kernel.shape[0] == 2
  ids, mask = ref.prompts((7, 4), 7, seed=41)
  expected = _expected(name, ids, mask).hidden_states[2].numpy()
  got = model(jnp.asarray(ids), jnp.asarray(mask), hidden_states=(2,))[0]
  assert ref.rel_err(got, expected) <= 2e-2   # weights stored in bfloat16


@pytest.mark.parametrize("name,component", [("t5-v1_1", "text_encoder_2"), ("clip-legacy-eos", "text_encoder")])
def test_convert_pipeline_component_takes_the_sibling_tokenizer(tmp_path, name, component):
  root = tmp_path / "pipeline"
  save_model(name, root / component, tokenizer=False, max_shard_size="8KB")
  save_tokenizer(root / component.replace("text_encoder", "tokenizer"))
  out = tmp_path / "out"
  convert_checkpoint(root / component, out)
  model = load_text_encoder(out)
  assert (out / "tokenizer" / "tokenizer_config.json").is_file()
  tm = ref.torch_model(name)
  eos = ref.VOCAB - 1 if name.startswith("clip") else None
  ids, mask = ref.prompts((9, 5), 9, seed=42, eos=eos)
  with torch.no_grad():
    expected = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  got = model(jnp.asarray(ids), jnp.asarray(mask))
  if name.startswith("clip"):
    assert ref.rel_err(got.pooler_output, expected.pooler_output.numpy()) <= 1e-5
    got = got.last_hidden_state
  assert ref.rel_err(got, expected.last_hidden_state.numpy()) <= 1e-5


def _edit_weights(folder, edit) -> None:
  (path,) = folder.glob("*.safetensors")
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"), "missing 1 tensor.*model.layers.1.self_attn.k_norm"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}), "unexpected 1 tensor"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((48, 31), np.float32)}),
     r"wrong shapes: model.layers.2.mlp.up_proj.weight \(48, 31\) \(expected \(48, 32\)\)"),
])
def test_bad_tensors_are_one_error_and_leave_nothing(tmp_path, edit, message):
  src, out = tmp_path / "src", tmp_path / "out"
  save_model("qwen3-causal-lm", src)
  _edit_weights(src, edit)
  with pytest.raises(CheckpointError, match=message):
    convert_checkpoint(src, out)
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_tokenizer_errors(tmp_path, capsys):
  src = tmp_path / "src"
  save_model("t5-relu", src, tokenizer=False)
  with pytest.raises(CheckpointError, match="no tokenizer for the text encoder"):
    convert_checkpoint(src, tmp_path / "out")
  save_tokenizer(src, size=ref.VOCAB + 20)
  capsys.readouterr()
  assert main(["convert", str(src), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and f"{ref.VOCAB + 20} tokens" in err[0]
  assert f"embeds only {ref.VOCAB}" in err[0]
  assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_text_layers_errors_and_loader_kinds(tmp_path):
  src = tmp_path / "src"
  save_model("clip-eos-id", src)
  with pytest.raises(CheckpointError, match="--text-layers applies to Qwen3 / Mistral"):
    convert_checkpoint(src, tmp_path / "out", text_layers=1)
  qwen = tmp_path / "qwen"
  save_model("qwen3-causal-lm", qwen)
  with pytest.raises(CheckpointError, match=r"--text-layers 4: .* has 3 layers \(expected 1..3\)"):
    convert_checkpoint(qwen, tmp_path / "out", text_layers=4)
  convert_checkpoint(src, tmp_path / "out")
  with pytest.raises(CheckpointError, match="is a converted CLIP text encoder, not a transformer.*load_text_encoder"):
    load_model(tmp_path / "out")
  assert load_text_encoder(tmp_path / "out").config.eos_token_id == ref.VOCAB - 3


_SHARDED_LOAD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from sparse_context_jax import load_text_encoder
    from sparse_context_jax.parallel import make_mesh
    assert len(jax.devices()) == 8
    mesh = make_mesh((2, 2, 2))   # data, fsdp, tensor
    sharded, single = load_text_encoder(sys.argv[1], mesh=mesh), load_text_encoder(sys.argv[1])
    spec = lambda a: [None if s is None else str(s) for s in a.sharding.spec] + [None] * (a.ndim - len(a.sharding.spec))
    ids = jnp.asarray(np.arange(16).reshape(2, 8) % 50 + 3)
    mask = jnp.asarray(np.arange(8)[None, :] < np.array([[8], [5]]))
    print(json.dumps(dict(
        q=spec(sharded.layers.q.kernel[...]), k=spec(sharded.layers.k.kernel[...]),
        down=spec(sharded.layers.mlp.down.kernel[...]), embed=spec(sharded.embed.embedding[...]),
        equal=float(jnp.max(jnp.abs(jax.jit(lambda i, m: sharded(i, m))(ids, mask) - single(ids, mask)))))))
""")


def test_load_text_encoder_onto_8_devices_by_the_logical_axes(tmp_path):
  save_model("qwen3-causal-lm", tmp_path / "src")
  convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  r = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path / "ckpt")], capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  # layer axis never split; embed -> fsdp, heads / kv_heads / mlp -> tensor, vocab rows whole
  assert got["q"] == [None, "fsdp", "tensor", None] and got["k"] == [None, "fsdp", "tensor", None]
  assert got["down"] == [None, "tensor", "fsdp"] and got["embed"] == [None, "fsdp"]
  assert got["equal"] <= 1e-5
