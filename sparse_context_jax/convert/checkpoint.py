"""The converted checkpoint of any kind (transformer, VAE): `config.json` plus an orbax checkpoint of the variables,
written and read layer by layer.

    OUT/config.json   {"kind": "transformer" | "vae" | "text-decoder" | "t5" | "clip", **config} (a transformer
                      folder without "kind" is one too)
    OUT/tokenizer/    a text encoder's tokenizer (transformers' files)
    OUT/params/       orbax checkpoint; its pytree nests the dotted variable paths, with stacked parameters
                      stored unstacked, one subtree per layer:
                      {"img_in": {"kernel": a}, "double_blocks": {"0": {"img_attn": {"qkv": {"kernel": a}}}}, ...}

Stacked parameters are written a few layers at a time (orbax partial saves: each adds some leaves to the same
checkpoint, uncompressed, in a background thread), so the writer holds a bounded number of layers (640 MiB of
parameters in flight by default); a converted pipeline folder (`pipeline_index`) holds one such folder per
component, and the loaders below pick theirs. `load` restores one layer at a time straight
into its sharding and copies it into a preallocated stacked buffer in place, so neither a host nor a device ever
holds more than its share of the model plus one layer. Where each parameter lives is decided by the logical-axis
rules of `parallel/rules.py`, the same rules training uses, so a loaded model is already in its train sharding
(variables without logical axes, the VAE's, are replicated).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import v1 as ocp_v1
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from sparse_context_jax.convert.kinds import KINDS, kind_named, kind_of
from sparse_context_jax.convert.output import atomic_output
from sparse_context_jax.convert.pipeline_index import component_of_kind, is_converted_pipeline
from sparse_context_jax.convert.state_dict import model_params
from sparse_context_jax.errors import CheckpointError
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.model.vae import AutoencoderKL
from sparse_context_jax.parallel.rules import DEFAULT_RULES, param_sharding
from sparse_context_jax.text import CLIPTextEncoder, DecoderEncoder, T5Encoder

CONFIG, PARAMS = "config.json", "params"
_PYTREE = "state"  # the name orbax's v1 layout gives the pytree inside a checkpoint

TreePath = tuple[str, ...]


def stored_path(param: str, layer: int | None) -> TreePath:
  """Where one layer of parameter `param` ("double_blocks.img_attn.qkv.kernel") lives in the stored tree."""
  head, *rest = param.split(".")
  return (head, *rest) if layer is None else (head, str(layer), *rest)


def _nest(flat: Mapping[TreePath, object]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def _flatten(tree: dict, prefix: TreePath = ()) -> dict[TreePath, object]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


DATA_FILE_BYTES = 64 << 20   # the size of the checkpoint's data files (orbax's default: 2 GB)


def _write_context():
  # Uncompressed: zstd would cost more CPU than the disk time it saves (the writer must keep up with the disk);
  # no defensive copy of every host array: the writer holds its arrays, unchanged, until their save completes.
  # Data files of 64 MiB, not one per save: tensorstore writes the files of a save concurrently and syncs each when
  # it is complete, so the disk flushes one file while the next is still being written (the writer alone, on a
  # disk that copies at ~700 MB/s: ~700 MB/s, against ~470 with one file per 256 MiB save).
  ctx = ocp_v1.Context()
  ctx.array.saving.use_compression = False
  ctx.array.saving.ocdbt_target_data_file_size = DATA_FILE_BYTES
  ctx.memory.deepcopy_host_arrays = False
  return ctx


def _drop_cached(folder: Path) -> None:
  """Asks the kernel to write back and drop the page cache of every file under `folder` (pages not yet written
  back stay until a later call): a conversion then reuses the same memory for each layer instead of growing the
  page cache by the whole checkpoint (slow where new memory is costly, e.g. VMs that give freed pages back)."""
  if not hasattr(os, "posix_fadvise"):
    return
  for root, _, files in os.walk(folder):
    for name in files:
      try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
      except OSError:
        continue
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      except OSError:
        pass
      finally:
        os.close(fd)


SAVE_BYTES = 1 << 28   # a writer's batches: 256 MiB (two Qwen3-4B layers, one FLUX.2 double block)


class CheckpointWriter:
  """Adds groups of host arrays to `directory/params`: groups are gathered into batches of `SAVE_BYTES` or more, each
  batch an orbax partial save that runs in a background thread while the caller prepares the next groups; `finish`
  saves the last batch, waits for them all and commits.

  Batches, not single groups, because every partial save re-reads the metadata of all the leaves saved before it:
  the cost of a conversion grows with the square of the number of saves.

  `empty(shape, dtype)` hands out arrays for the next group, recycling those of groups already written (layers of a
  stack have the same shapes): a conversion then works in the same memory layer after layer, instead of the
  kernel zeroing fresh pages for every one.

  Args:
    directory: the converted folder (its `config.json` is written at once).
    cfg: the model's config.
    in_flight_bytes: how many bytes of arrays the writer may hold (batches being saved or gathered); `room`
      blocks beyond it.
  """

  def __init__(self, directory: Path, cfg, *, in_flight_bytes: int = 640 << 20):
    self._params = Path(directory) / PARAMS
    self._budget = in_flight_bytes
    self._pending: list[tuple[concurrent.futures.Future, list[np.ndarray]]] = []   # oldest first
    self._batch: dict[TreePath, np.ndarray] = {}     # groups added but not yet given to a save
    self._free: dict[tuple, list[np.ndarray]] = {}   # (shape, dtype) -> arrays already written, for reuse
    self._asked: set[tuple] = set()                  # the (shape, dtype)s the group being prepared asked for
    self._last: set[tuple] = set()                   # ... and those the group added last asked for
    # One writer thread: orbax partial saves must run one after another (overlapping ones corrupt the database).
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
    self._context = _write_context()
    (Path(directory) / CONFIG).write_text(json.dumps(kind_of(cfg).to_dict(cfg), indent=2, sort_keys=True))

  def _retire(self) -> None:
    future, arrays = self._pending.pop(0)
    future.result()   # raises the save's error, if any
    wanted = self._asked | self._last   # the shapes of the groups at hand: other arrays' memory is given back now
    for a in arrays:   # recycled: arrays that own their memory (not views of another array) of a wanted shape
      if a.base is None and (a.shape, a.dtype) in wanted:
        self._free.setdefault((a.shape, a.dtype), []).append(a)

  def _held(self) -> int:
    return sum(a.nbytes for _, arrays in self._pending for a in arrays) + sum(a.nbytes for a in self._batch.values())

  def _flush(self) -> None:
    """Starts the partial save of the gathered batch."""
    if self._batch:
      self._pending.append((self._thread.submit(self._save, _nest(self._batch)), list(self._batch.values())))
      self._batch = {}

  def room(self, nbytes: int) -> None:
    """Waits until `nbytes` more fit in the in-flight budget (at least one group always does)."""
    while True:
      if self._pending and self._pending[0][0].done():
        self._retire()
      elif self._held() + nbytes <= self._budget:
        return
      elif self._pending:
        self._retire()   # waits for the oldest save
      elif self._batch:
        self._flush()
      else:
        return

  def empty(self, shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array for the next group: a recycled one where one fits."""
    key = (tuple(shape), np.dtype(dtype))
    self._asked.add(key)
    free = self._free.get(key)
    return free.pop() if free else np.empty(*key)

  def add(self, arrays: Mapping[TreePath, np.ndarray]) -> None:
    """Adds one group to the batch (saved once the batch is big enough); the arrays must not change until `finish`
    (they are written as they are)."""
    self.room(sum(a.nbytes for a in arrays.values()))
    for key in set(self._free) - self._asked:   # shapes the model has moved past: give their memory back
      del self._free[key]
    self._last, self._asked = self._asked, set()
    self._batch.update(arrays)
    if sum(a.nbytes for a in self._batch.values()) >= SAVE_BYTES:
      self._flush()

  def _save(self, tree: dict) -> None:
    with self._context:
      ocp_partial.save(self._params, tree)
    _drop_cached(self._params.parent)

  def finish(self) -> None:
    self._flush()
    while self._pending:
      self._retire()
    self._free.clear()
    with self._context:
      ocp_partial.finalize(self._params)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    # After an error, let the background saves end before the caller removes their folder.
    for response, _ in self._pending:
      try:
        response.result()
      except Exception:  # noqa: BLE001 -- the error being raised already tells what went wrong
        pass
    self._pending.clear()
    self._batch.clear()
    self._free.clear()
    self._thread.shutdown()


def read_config(path: str | os.PathLike):
  """The config of a folder written by `convert` (an `MMDiTConfig`, a `VAEConfig`, ...): its kind tells which."""
  path = Path(path)
  if not (path / CONFIG).is_file() or not (path / PARAMS / _PYTREE).is_dir():
    raise CheckpointError(f"{path} is not a converted checkpoint (expected {CONFIG} and an orbax {PARAMS}/ "
                          "written by `convert`)")
  try:
    d = json.loads((path / CONFIG).read_text())
    return kind_named(d.get("kind", "transformer"), str(path / CONFIG)).from_dict(d)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path / CONFIG}: {e}") from None


def stored_dtype(path: str | os.PathLike) -> np.dtype:
  """The one dtype of every stored parameter."""
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path) / PARAMS / _PYTREE)
  dtypes = {np.dtype(m.dtype) for m in jax.tree.leaves(meta)}
  if len(dtypes) != 1:
    raise CheckpointError(f"{path} holds parameters of several dtypes {sorted(map(str, dtypes))}")
  return dtypes.pop()


def restore(path: str | os.PathLike, targets: Mapping[TreePath, jax.ShapeDtypeStruct | np.dtype]) -> dict:
  """Reads some stored leaves: a `jax.ShapeDtypeStruct` target with a sharding gives a `jax.Array` in that
  sharding (each device's shard read and cast separately); a numpy dtype gives a host array."""
  return restore_tree(Path(path) / PARAMS / _PYTREE, targets)


def restore_tree(tree_dir: str | os.PathLike, targets: Mapping[TreePath, jax.ShapeDtypeStruct | np.dtype]) -> dict:
  """`restore` from any orbax pytree folder (a converted checkpoint's, a training run's state): the leaves at the
  paths of `targets`, the rest left unread."""
  def args(t):
    if isinstance(t, jax.ShapeDtypeStruct):
      return ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=t)
  item = _nest({p: (t if isinstance(t, jax.ShapeDtypeStruct) else np.zeros((), t)) for p, t in targets.items()})
  restore_args = _nest({p: args(t) for p, t in targets.items()})
  tree = ocp.PyTreeCheckpointer().restore(
      Path(tree_dir),
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  return _flatten(tree)


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer(sharding):
  # Donating the stacked buffer makes the update in place: no second copy of a stack on any device.
  return jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0),
                 donate_argnums=0, out_shardings=sharding)


def _layer_sharding(stacked: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(stacked, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*stacked.spec[1:]))
  return stacked


def _stacking_axes(var) -> int:
  """Leading layer axes of a variable: those beyond its logical axes (none without logical axes)."""
  logical_axes = var.get_metadata().get("logical_axes")
  return 0 if logical_axes is None else len(var.shape) - len(logical_axes)


def placement(var: nnx.Variable, mesh: jax.sharding.Mesh | None,
              rules: Mapping[str, str | None] = DEFAULT_RULES) -> jax.sharding.Sharding:
  """Where a loaded variable lives: the first device without a mesh; on a mesh, the sharding its logical axes and
  `rules` give it (replicated without logical axes)."""
  logical_axes = var.get_metadata().get("logical_axes")
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if logical_axes is None:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return param_sharding(mesh, tuple(var.shape), logical_axes, rules)


def load(path: str | os.PathLike, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
         rules: Mapping[str, str | None] = DEFAULT_RULES, **module_kw) -> nnx.Module:
  """The module (transformer, VAE, ...) of a folder written by `convert`, as its `config.json` names it.

  Args:
    path: the converted folder.
    dtype: parameter and compute dtype (stored parameters are cast on read; a VAE's BatchNorm statistics stay
      float32).
    mesh: when given, each variable is read shard by shard straight into the sharding that the logical-axis
      `rules` give it (`parallel/rules.py`, the same placement as training; replicated without logical axes);
      else everything goes to the first device.
    rules: logical axis -> mesh axis (None = replicated); used only with a mesh.
    module_kw: further module options (the transformer's scan_layers, remat, attention_impl).
  """
  path = Path(path)
  cfg = read_config(path)
  abstract = kind_of(cfg).abstract(cfg, dtype=dtype, param_dtype=dtype, **module_kw)
  graphdef, abstract_state = nnx.split(abstract)
  flat = nnx.to_flat_state(abstract_state)

  # name -> (shape, dtype, layers (0 = not stacked), sharding); logical_axes name the axes before layer stacking.
  info = {".".join(map(str, p)): (tuple(var.shape), var.dtype, _stacking_axes(var), placement(var, mesh, rules))
          for p, var in flat}

  try:
    unstacked = {name: i for name, i in info.items() if i[2] == 0}
    got = restore(path, {stored_path(name, None): jax.ShapeDtypeStruct(shape, dt, sharding=sh)
                         for name, (shape, dt, _, sh) in unstacked.items()})
    values = {name: got[stored_path(name, None)] for name in unstacked}
    stacks: dict[str, list[str]] = {}
    for name, (_, _, n, _) in info.items():
      if n:
        stacks.setdefault(name.split(".")[0], []).append(name)
    for names in stacks.values():
      depth = info[names[0]][0][0]
      for name in names:
        shape, dt, _, sh = info[name]
        values[name] = _zeros(shape, jnp.dtype(dt), sh)()
      for i in range(depth):
        got = restore(path, {stored_path(name, i): jax.ShapeDtypeStruct(info[name][0][1:], info[name][1],
                                                                         sharding=_layer_sharding(info[name][3]))
                             for name in names})
        for name in names:
          values[name] = _set_layer(info[name][3])(values[name], got.pop(stored_path(name, i)), np.int32(i))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"cannot restore the parameters of {path}: {e}") from None

  state = nnx.from_flat_state([(p, var.replace(values[".".join(map(str, p))])) for p, var in flat])
  return nnx.merge(graphdef, state)


def _component(path, kinds: set[str], noun: str) -> Path:
  """`path`, or the one component of those `kinds` when `path` is a pipeline folder written by `convert`."""
  return component_of_kind(path, kinds, noun) if is_converted_pipeline(path) else Path(path)


def _load_kind(path, kind: str, **kw) -> nnx.Module:
  path = _component(path, {kind}, KINDS[kind].noun)
  cfg = read_config(path)
  found = kind_of(cfg)
  if found.name != kind:
    raise CheckpointError(f"{path} is a converted {found.noun}, not a {KINDS[kind].noun} (load it with "
                          f"{found.loader})")
  return load(path, **kw)


def load_model(path: str | os.PathLike, *, step: int | None = None, ema: bool = False,
               lora: Sequence[tuple[str | os.PathLike, float]] = (), **kw) -> MMDiT:
  """`load` for a converted transformer (a CheckpointError names what else the folder holds); a converted pipeline
  folder gives its transformer; a training run (RUN_DIR or RUN_DIR/checkpoints/STEP) the weights of its latest
  step, or of `step`, or their EMA (`ema`), in the model its config names (`convert/run.py`).

  `lora`: (LoRA .safetensors file, scale) pairs merged into the loaded weights (`convert/lora_in.py`: diffusers /
  peft, kohya and BFL / ComfyUI names; W += scale * alpha / r * B . A in float32, the LoRAs summed); every file is
  checked before any weight changes, a CheckpointError names what does not fit."""
  from sparse_context_jax.convert.lora_in import merge_loras
  from sparse_context_jax.convert.run import is_run, load_run_model   # run.py reads checkpoints through this module
  if is_run(path):
    model = load_run_model(path, step=step, ema=ema, **kw)
  elif step is not None or ema:
    raise CheckpointError(f"{path} is not a training run: step and ema select the weights of a run's checkpoint")
  else:
    model = _load_kind(path, "transformer", **kw)
  if lora:
    merge_loras(model, lora)
  return model


def load_vae(path: str | os.PathLike, *, dtype=jnp.float32) -> AutoencoderKL:
  """`load` for a converted VAE (a converted pipeline folder: its VAE)."""
  return _load_kind(path, "vae", dtype=dtype)


def load_text_encoder(path: str | os.PathLike, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                      **module_kw) -> DecoderEncoder | T5Encoder | CLIPTextEncoder:
  """`load` for a converted text encoder (Qwen3 / Mistral, T5 or CLIP, as its config.json names it); its
  tokenizer is in `path/tokenizer`. `module_kw`: `scan_layers`. A converted pipeline folder gives its one text
  encoder."""
  path = _component(path, {k.name for k in KINDS.values() if k.text}, "text encoder")
  cfg = read_config(path)
  found = kind_of(cfg)
  if not found.text:
    raise CheckpointError(f"{path} is a converted {found.noun}, not a text encoder (load it with {found.loader})")
  return load(path, dtype=dtype, mesh=mesh, **module_kw)


def save(module: nnx.Module, out: str | os.PathLike, *, force: bool = False) -> None:
  """Writes a live module (transformer or VAE) as `convert` does, in its variables' dtypes: `load(out)` gives it
  back. Atomic: on any error nothing is left at `out`."""
  params = model_params(module)
  stacked = {".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(module)) if _stacking_axes(v)}
  with atomic_output(out, force=force, directory=True) as tmp:
    with CheckpointWriter(tmp, module.config) as writer:
      writer.add({stored_path(k, None): v for k, v in params.items() if k not in stacked})
      for k in stacked:
        writer.add({stored_path(k, i): layer for i, layer in enumerate(params[k])})
      writer.finish()
