"""`convert` and `export` of every kind of model (`kinds.KINDS`), streamed: the rules applied one layer at a time,
read and written as they go.

A group is every rule of the unstacked variables (embedders, shared modulations, final layer; a whole VAE), or
every rule of one layer of one block stack. Converting a group reads only its torch tensors, so host memory holds
a few layers (two read buffers, the groups being converted and written: 640 MiB by default; the largest
group, a FLUX.2-dev single block, is ~1 GB in bfloat16) whatever the checkpoint size. Three stages overlap: a group is
converted while the next one is read (into a second read buffer) and the previous ones are written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sparse_context_jax.convert.rules import (Rule, layer_formats, source_keys, target_keys, to_params, to_torch,
                                             torch_shapes)
from sparse_context_jax.convert.checkpoint import CheckpointWriter, read_config, restore, stored_dtype, stored_path
from sparse_context_jax.convert.kinds import KINDS, LAYOUTS, detect_kind, kind_of
from sparse_context_jax.convert.output import atomic_output, check_destination
from sparse_context_jax.convert.run import RunWeights, is_run, open_run
from sparse_context_jax.convert.safetensors_io import DTYPE_NAMES, SafetensorsWriter
from sparse_context_jax.convert.sources import open_source
from sparse_context_jax.convert.state_dict import ModelSpec, check_tensors
from sparse_context_jax.convert.tokenizer import TOKENIZER_DIR, check_tokenizer, copy_tokenizer, find_tokenizer
from sparse_context_jax.errors import CheckpointError, format_keys
from sparse_context_jax.progress import progress

SOURCE_DTYPES = tuple(np.dtype(d) for d in ("float64", "float32", "float16", jnp.bfloat16))
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


@dataclasses.dataclass
class Group:
  layer: int | None                      # None: the unstacked parameters
  rules: list[tuple[Rule, dict]]         # (rule, str.format arguments of this layer)
  torch_keys: list[str]
  param_keys: list[str]                  # unstacked parameter paths (stacked ones: this layer's slice)


def rule_groups(spec: ModelSpec, layout: str) -> list[Group]:
  """The rules of `layout`, grouped by layer: the unstacked group, then each layer of each stack in order."""
  groups: dict[tuple[str, int] | None, Group] = {}
  for rule in spec.rules(layout):
    targets = target_keys(rule, spec.has_bias)
    for layer, fmt in layer_formats(rule):
      key = None if layer is None else (targets[0].split(".")[0], layer)
      g = groups.setdefault(key, Group(layer, [], [], []))
      g.rules.append((rule, fmt))
      g.torch_keys += source_keys(rule, spec.has_bias, fmt)
      g.param_keys += targets
  return [groups[k] for k in sorted(groups, key=lambda k: (k is not None, k or ("", 0)))]


def _bar(total_bytes: int, desc: str, enabled: bool | None):
  # enabled=None: a bar on a terminal, plain lines every few seconds otherwise (`sparse_context_jax.progress`).
  return progress(total_bytes, desc, "B", enabled=enabled)


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                       config: str | None = None, force: bool = False, progress: bool | None = None,
                       text_layers: int | None = None, reference_attention: str | None = None,
                       note: Callable[[str], None] | None = None):
  """Converts a PyTorch checkpoint (a FLUX transformer or VAE: file or diffusers folder, BFL or diffusers layout; a
  transformers text-encoder folder) into a directory `out` of `config.json` + an orbax checkpoint, in `dtype`
  ("float32" or "bfloat16"); a text encoder's tokenizer goes to `out/tokenizer`.

  Every tensor name, shape and dtype is checked against the rules before any data is read; any mismatch is a
  `CheckpointError` naming the file and keys. Tensors the model never reads (an LM head, layers after
  `text_layers`, a vision tower) are skipped, and `note` (default: stderr) is told which. Returns the detected
  configuration (`MMDiTConfig`, `VAEConfig`, `DecoderConfig`, ...).

  Args:
    text_layers: keep only the first N layers of a Qwen3 / Mistral text encoder (a pipeline that reads hidden
      state N needs no later layer: FLUX.2 klein reads 9, 18, 27; FLUX.2 dev 10, 20, 30). Default: every layer.
    reference_attention: a transformer's `MMDiTConfig.reference_attention` ("kv" for a `Flux2KleinKVPipeline`'s),
      which neither a diffusers config.json nor the tensors record. Default: the file's safetensors metadata key
      `reference_attention` (`export` writes it), else the config's own. `config` (a --config file) wins over both.
  """
  note = note or (lambda line: print(f"note: {line}", file=sys.stderr))
  if dtype not in OUTPUT_DTYPES:
    raise CheckpointError(f"dtype {dtype!r}; expected one of {sorted(OUTPUT_DTYPES)}")
  out_dtype = OUTPUT_DTYPES[dtype]
  check_destination(out, force)
  source = open_source(src)
  try:
    kind = detect_kind(source.keys(), source.config)
    keys = [k for k in source.keys() if k not in kind.ignored]
    layout = kind.detect_layout(keys, source.description)
    shapes = {k: source.shape(k) for k in keys}
    cfg = _cut(kind.resolve_config(shapes, layout, source.description, source.config, config), kind, text_layers,
               source.description)
    cfg = _reference_attention(cfg, kind, reference_attention if config is None else None,
                               None if config is not None else source.metadata.get(REFERENCE_ATTENTION_KEY),
                               source.description)
    unread = kind.unread_keys(cfg, layout, keys)
    keys = [k for k in keys if k not in unread]
    spec = ModelSpec(cfg)
    check_tensors(spec.expected_torch_shapes(layout), {k: shapes[k] for k in keys},
                  f"{source.description}: {spec.what(layout)}")
    bad = [f"{k} {DTYPE_NAMES[source.dtype(k)]}" for k in keys if source.dtype(k) not in SOURCE_DTYPES]
    if bad:
      raise CheckpointError(f"{source.description} has tensors of non-float dtype: {format_keys(bad)} (expected "
                            "F32, BF16, F16 or F64)")
    tokenizer = find_tokenizer(source.description) if kind.text else None

    groups = rule_groups(spec, layout)
    total = sum(source.nbytes(k) for k in keys)
    # Three stages at once: the next group is read while this one is converted and earlier ones are written. The
    # unstacked group is read into a buffer of its own, so its tensors that need no change (an embedding) are
    # written from where they were read, uncopied.
    unstacked = [i for i, g in enumerate(groups) if g.layer is None]
    with _frozen_gc(), atomic_output(out, force=force, directory=True) as tmp, CheckpointWriter(tmp, cfg) as writer, \
        _bar(total, f"convert {Path(source.description).name}", progress) as bar, \
        contextlib.closing(source.read_groups([g.torch_keys for g in groups], once=unstacked)) as reads, \
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer-check") as checker:
      checked = None   # the tokenizer's check (a child process importing transformers) runs beside the weights
      if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        checked = checker.submit(check_tokenizer, tmp / TOKENIZER_DIR, cfg.vocab_size,
                                 f"{source.description} ({kind.noun})")
      done = 0
      for g, tensors in zip(groups, reads):
        if checked is not None and checked.done():
          checked.result()   # a bad tokenizer stops the conversion as soon as it is known
        # Bounded memory: wait for earlier groups' writes while this one's parameters would overflow the budget.
        writer.room(sum(source.nbytes(k) // source.dtype(k).itemsize for k in g.torch_keys) * out_dtype.itemsize)
        params = {}
        for rule, fmt in g.rules:
          params.update(to_params(rule, tensors, fmt, spec.layouts, spec.has_bias, out_dtype, writer.empty,
                                  copy=g.layer is not None))
        done += len(tensors)
        bar.update(sum(t.nbytes for t in tensors.values()))
        bar.set_postfix(tensors=f"{done}/{len(keys)}")
        del tensors
        writer.add({stored_path(k, g.layer): v for k, v in params.items()})
        del params
      if checked is not None:
        checked.result()
      writer.finish()
  finally:
    source.close()
  for why in sorted(set(unread.values())):
    names = [k for k, w in unread.items() if w == why]
    note(f"skipped {len(names)} tensor(s) never read ({why}): {format_keys(names, limit=3)}")
  return cfg


@contextlib.contextmanager
def _frozen_gc():
  """The cyclic garbage collector leaves the objects that exist now (the imported libraries: most of the heap)
  alone until the block ends: its full collections otherwise walk them again and again while orbax's saves make
  their short-lived objects, holding the interpreter that the conversion's threads share."""
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


REFERENCE_ATTENTION_KEY = "reference_attention"   # safetensors metadata of an exported KV transformer


def _reference_attention(cfg, kind, given: str | None, stored: str | None, what: str):
  """`cfg` with the reference attention of a KV model (`given` by the caller, else `stored` in the file)."""
  mode = given if given is not None else stored
  if mode is None or kind.name != "transformer":
    return cfg
  try:
    return cfg.replace(reference_attention=mode)
  except ValueError as e:
    raise CheckpointError(f"{what}: {e}") from None


def _cut(cfg, kind, text_layers: int | None, what: str):
  """`cfg` with only its first `text_layers` layers (a decoder-only text encoder)."""
  if text_layers is None:
    return cfg
  if kind.name != "text-decoder":
    raise CheckpointError(f"--text-layers applies to Qwen3 / Mistral text encoders; {what} is a {kind.noun}")
  if not 0 < text_layers <= cfg.num_hidden_layers:
    raise CheckpointError(f"--text-layers {text_layers}: {what} has {cfg.num_hidden_layers} layers (expected "
                          f"1..{cfg.num_hidden_layers})")
  return cfg.replace(num_layers=text_layers)


class ConvertedWeights:
  """A converted checkpoint's weights as the exporter reads them: `read(names, layer)` gives host arrays of some
  parameters, one layer of their stack (or whole, `layer=None`), in the stored dtype (`convert/run.py`'s
  `RunWeights` reads a training run's the same way)."""

  def __init__(self, ckpt: str | os.PathLike):
    self.ckpt, self.config, self.dtype = ckpt, read_config(ckpt), stored_dtype(ckpt)

  def read(self, names, layer: int | None) -> dict[str, np.ndarray]:
    got = restore(self.ckpt, {stored_path(k, layer): self.dtype for k in names})
    return {k: got[stored_path(k, layer)] for k in names}


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, layout: str, force: bool = False,
                      progress: bool | None = None, step: int | None = None, ema: bool = False) -> None:
  """Writes a converted checkpoint (any kind), or a training run's weights (RUN_DIR or RUN_DIR/checkpoints/STEP:
  the latest step unless `step`, their EMA with `ema`), as one `.safetensors` file in `layout` ("bfl" or
  "diffusers"), in the stored dtype, one layer at a time: the inverse of `convert_checkpoint`, tensor for tensor."""
  if layout not in {name for kind in KINDS.values() for name in kind.layouts}:
    raise CheckpointError(f"layout {layout!r}; expected one of {LAYOUTS}")
  check_destination(out, force)
  if is_run(ckpt):
    weights = RunWeights(open_run(ckpt, step=step, ema=ema))
  elif step is not None or ema:
    raise CheckpointError(f"{ckpt} is not a training run: step and ema select the weights of a run's checkpoint")
  else:
    weights = ConvertedWeights(ckpt)
  cfg, dtype = weights.config, weights.dtype
  kind = kind_of(cfg)
  if layout not in kind.layouts:
    raise CheckpointError(f"layout {layout!r}: a converted {kind.noun} exports as one of {kind.layouts}")
  spec = ModelSpec(cfg)
  groups = rule_groups(spec, layout)
  entries = [(name, dtype, shape) for g in groups for rule, fmt in g.rules
             for name, shape in torch_shapes(rule, fmt, spec.layouts, spec.has_bias, spec.param_shapes).items()]
  total = sum(int(np.prod(s)) * dtype.itemsize for _, _, s in entries)
  with atomic_output(out, force=force, directory=False) as tmp, \
      _bar(total, f"export {Path(out).name}", progress) as bar:
    metadata = {"format": "pt"}
    if getattr(cfg, "reference_attention", "joint") != "joint":   # a KV transformer: `convert` reads it back
      metadata[REFERENCE_ATTENTION_KEY] = cfg.reference_attention
    writer, done = SafetensorsWriter(tmp, entries, metadata), 0
    for g in groups:
      params = weights.read(g.param_keys, g.layer)
      for rule, fmt in g.rules:
        for name, array in to_torch(rule, params, fmt, spec.layouts, spec.has_bias).items():
          writer.write(name, array)
          done += 1
          bar.update(array.nbytes)
      bar.set_postfix(tensors=f"{done}/{len(entries)}")
    writer.close()
