"""The train program, one linear function with banner sections (config, mesh, input, model, state, loop).

    state = train(config, workdir)   # resumes from <workdir>/checkpoints when there is one
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
import zlib

import grain
import jax
import numpy as np

from sparse_context_jax.convert.output import atomic_output
from sparse_context_jax.convert.run import ENCODERS_FILE
from sparse_context_jax.data.latent_pipeline import make_latent_pipeline
from sparse_context_jax.data.pipeline import make_pipeline
from sparse_context_jax.parallel import batch_sharding, make_mesh
from sparse_context_jax.progress import progress
from sparse_context_jax.train.batches import latent_batch, pixel_batch, run_encoder_record, run_encoders
from sparse_context_jax.train.checkpoint import RunCheckpoints
from sparse_context_jax.train.config import ConfigError, model_config, resume_changes, validate
from sparse_context_jax.train.metrics import MetricsWriter
from sparse_context_jax.train.objective import step_rung
from sparse_context_jax.train.state import init_state, load_params, setup
from sparse_context_jax.train.step import step_programs


def dataset_path(config, workdir: str) -> str:
  """`data.path`, or the synthetic world `data.world` written once under the workdir."""
  if config.data.path:
    return config.data.path
  from sparse_context_jax.data import WorldRecords, write_dataset
  path = os.path.join(workdir, "world")
  if not os.path.exists(os.path.join(path, "metadata.json")) and not os.path.isdir(path):
    w = config.data.world
    if jax.process_index() == 0:
      records = WorldRecords(w.count, w.seed, tuple(w.size), w.max_refs, tuple(w.tasks))
      write_dataset(records, path, max_refs=w.max_refs, metadata=records.metadata())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("world dataset written")
  return path


@dataclasses.dataclass
class Outcome:
  """How a run ended: the last step saved, and whether a signal stopped it before its last step."""

  step: int = 0
  preempted: bool = False


@contextlib.contextmanager
def _removed_if_never_started(workdir: str):
  """Creates `workdir`; if it did not exist and the body fails, removes it again (a run that never ran a step
  leaves nothing behind)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a folder")
  fresh = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    yield
  except BaseException:
    if fresh and jax.process_index() == 0:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def train(config, workdir: str, *, stop_after: int | None = None, devices=None,
          outcome: Outcome | None = None) -> dict:
  """Runs (or resumes) the run in `workdir` up to `config.train.steps`, or `stop_after` more steps; returns the
  final state. Saves every `checkpoint.every` steps, at the end, and on SIGTERM or SIGINT (then returns; a second
  SIGINT aborts at once). `devices`: the mesh's devices (default all). `outcome`, when given, is filled in.

  A resumed run refuses a config that changes what it trains (`config.resume_changes`); the changes it allows
  (steps, logging, checkpoint cadence, mesh, ...) are applied and logged as an event.
  """
  # ---- Config and mesh ---------------------------------------------------------------------------------------
  devices = jax.devices() if devices is None else list(devices)
  validate(config, len(devices), jax.process_count())
  cfg = model_config(config)
  mesh = make_mesh(config.mesh, devices)
  batch_size = config.train.batch_size
  config_json = config.to_json_best_effort()
  with _removed_if_never_started(workdir):
    state, data, ckpt, log, static, to_model, ratios = _start(config, cfg, mesh, workdir, config_json)
  start = int(jax.device_get(state["step"]))

  # ---- Loop ---------------------------------------------------------------------------------------------------
  programs = step_programs(static, config)
  stop = {"signal": None}

  def on_signal(sig, frame):
    if sig == signal.SIGINT and stop["signal"] is not None:
      raise KeyboardInterrupt   # a second Ctrl-C: abort now, without waiting for the step and its save
    stop["signal"] = sig

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  end = config.train.steps if stop_after is None else min(config.train.steps, start + stop_after)
  bar = progress(end, "train", "step", initial=start, enabled=config.log.progress and jax.process_index() == 0)
  step, last = start, time.perf_counter()
  try:
    while step < end:
      raw = next(data)
      local, grid = to_model(raw)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
               for k, v in local.items()}
      rung = step_rung(config.objective, config.seed, step, grid, local["refs"].shape[1])
      compiled = programs.count
      tic = time.perf_counter()
      program = programs.compiled(state, batch, rung=rung)
      if programs.count > compiled:
        log.write({"event": "compile", "step": step, "keep": rung.ratio, "grid": list(grid),
                   "seconds": round(time.perf_counter() - tic, 3)})
        last += time.perf_counter() - tic   # compile time is not step time
      state, metrics = program(state, batch)
      step += 1
      ratios[rung.ratio] += 1
      bar.update(1)
      # Every process saves and stops at the same step: the decision is agreed once per step and kept (a signal
      # arriving later in this step counts at the next one, never at a checkpoint only some processes reach).
      stopping = _any_process(stop["signal"] is not None)
      if step % config.log.every == 0 or step == end:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        seconds = (now - last) / (config.log.every if step % config.log.every == 0 else 1)
        seq = local["txt"].shape[1] + rung.length(grid[0] * grid[1])   # the packed sequence the step runs
        log.write({"step": step, **m, "keep": rung.ratio, "step_seconds": seconds,
                   "examples_per_s": batch_size / seconds, "tokens_per_s": batch_size * seq / seconds,
                   "keep_histogram": {str(k): v for k, v in sorted(ratios.items())},
                   "batch_crc32": _batch_crc32(raw)})
        bar.set_postfix(loss=f"{m['loss']:.4f}", keep=rung.ratio)
        last = now
      if step % config.checkpoint.every == 0 or step == end or stopping:
        ckpt.save(step, state, data.get_state(), config_json, force=True, counters=_counters(ratios))
      if stopping:
        log.write({"event": "preempted", "step": step})
        break
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    bar.close()
    ckpt.close()
    log.close()
  if outcome is not None:
    outcome.step, outcome.preempted = step, step < end
  return state


def _counters(ratios: collections.Counter) -> dict:
  """What accumulates over a run and is checkpointed with it: the keep-ratio histogram."""
  return {"keep_histogram": [[float(k), int(v)] for k, v in sorted(ratios.items())]}


def _start(config, cfg, mesh, workdir: str, config_json: str):
  """The input pipeline, the restored or initial state, the checkpoints and metrics of a run (see `train`)."""
  batch_size = config.train.batch_size
  # ---- Input: this process's rows of every global batch ------------------------------------------------------
  per_process = batch_size // jax.process_count()
  _check_process_rows(mesh, batch_size)
  common = dict(batch_size=per_process, seed=config.data.seed, max_refs=config.data.max_refs,
                worker_count=config.data.worker_count,
                shard=grain.sharding.ShardOptions(jax.process_index(), jax.process_count()))
  if config.data.encoder == "latents":   # precomputed VAE latents and text embeddings
    pipeline = make_latent_pipeline(config.data.path, **common)
    to_model = lambda raw: latent_batch(raw, cfg)
  else:                                  # pixels through the run's encoders (the local mode's stand-ins)
    pipeline = make_pipeline(dataset_path(config, workdir), resolution=config.data.resolution, **common)
    image, text = run_encoders(config, cfg)
    to_model = lambda raw: pixel_batch(raw, cfg, image, text)
  data = iter(pipeline)

  if jax.process_index() == 0:
    _record_encoders(workdir, run_encoder_record(config, cfg))

  # ---- Model and train state: resume, else initialise (from a converted checkpoint or at random) -------------
  static = setup(config, cfg, mesh)
  ckpt = RunCheckpoints(workdir, config.checkpoint.keep)
  latest = ckpt.latest_step()
  ratios = collections.Counter()
  changed = {}
  if latest is not None:
    stored = ckpt.meta(latest)
    changed, warnings = resume_changes(stored["config"], json.loads(config_json))
    for w in warnings:
      if jax.process_index() == 0:
        print(f"warning: {w}", file=sys.stderr)
    state, data_state, meta = ckpt.restore(latest, static.abstract)
    data.set_state(data_state)
    ratios.update({float(k): int(v) for k, v in meta.get("counters", {}).get("keep_histogram", [])})
  else:
    params = None
    if config.model.init:
      params = load_params(config, cfg, static)
    state = init_state(config, cfg, static, params)
  start = int(jax.device_get(state["step"]))
  log = MetricsWriter(workdir, start_step=start)   # a resumed run drops the records of the steps it redoes
  if changed:
    log.write({"event": "resume_config", "step": start, "changed": changed})
  return state, data, ckpt, log, static, to_model, ratios


def _record_encoders(workdir: str, record: dict) -> None:
  """Writes (atomically) what the run's tokens and text come from (`ENCODERS_FILE`): `generate --model RUN_DIR`
  builds the same encoders again."""
  with atomic_output(os.path.join(workdir, ENCODERS_FILE), force=True, directory=False) as tmp:
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))


def _check_process_rows(mesh, batch: int) -> None:
  """Invariant: the batch sharding gives this process the contiguous block of rows its pipeline reads
  (`make_pipeline`'s shard rows), so the global batch is the one a single process would read."""
  if jax.process_count() == 1:
    return
  rows = batch_sharding(mesh, 1).addressable_devices_indices_map((batch,)).values()
  got = sorted({i for index in rows for i in range(*index[0].indices(batch))})
  share = batch // jax.process_count()
  want = list(range(jax.process_index() * share, (jax.process_index() + 1) * share))
  if got != want:
    raise RuntimeError(f"process {jax.process_index()} holds batch rows {got[:4]}... of the mesh's batch sharding, "
                       f"not its pipeline rows {want[0]}..{want[-1]}: order the mesh devices by process")


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a SIGTERM may reach one worker first)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _batch_crc32(raw: dict) -> int:
  """CRC32 of the global batch's record indices (and padding flags): the data order, comparable across runs."""
  index, valid = raw["index"].astype(np.int32), raw["valid"].astype(np.int32)   # int32: what allgather keeps
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    index, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True), np.int32) for x in (index, valid))
  return zlib.crc32(np.stack([index, valid]).tobytes())
