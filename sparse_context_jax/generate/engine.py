"""Batch generation: jobs of equal shapes share a batch and one compiled sampling program; the batch is sharded
over the `data` axis of a device mesh.

Per job (once): reference images -> VAE tokens -> sparse packing (the job's strategy and budget, a rung of the
bucket ladder) and seeded noise. Per batch: the whole denoising loop in one program, then the VAE decode.
A job's result does not depend on its batch-mates: its noise comes from its own seed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_context_jax.generate.jobs import Job
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.model.positions import text_ids
from sparse_context_jax.model.vae import AutoencoderKL, decode_tokens, encode_tokens
from sparse_context_jax.programs import ProgramCache
from sparse_context_jax.sampling import Conditioning, make_sampler, schedule_for
from sparse_context_jax.sparse import BucketLadder, Reference, SparsePacker, SparseRequest


@dataclasses.dataclass
class Prepared:
  job: Job
  noise: np.ndarray          # (N, C)
  img: np.ndarray            # (L, C) packed target + kept reference tokens + padding
  img_ids: np.ndarray        # (L, n_axes)
  length: int                # valid image tokens
  bucket: float
  kept: list[int]            # per reference


@dataclasses.dataclass
class Result:
  job: Job
  pixels: np.ndarray         # (H, W, 3) uint8
  latents: np.ndarray        # (N, C) float32
  prepared: Prepared
  batch_seconds: float       # wall time of the job's batch (sampling + decode)
  batch_size: int


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Generator:
  """Holds the model, the VAE, the mesh and every compiled program (`programs()` lists their compile times)."""

  def __init__(self, model: MMDiT, vae: AutoencoderKL, *, mesh: Mesh | None = None, batch_size: int = 4,
               ladder: BucketLadder = BucketLadder(), max_refs: int | None = None):
    cfg, vcfg = model.config, vae.config
    if vcfg.family != cfg.family or vcfg.token_channels != cfg.in_channels or vcfg.downsample != 8:
      raise ValueError(f"the VAE ({vcfg.family}, {vcfg.token_channels}-channel tokens, {vcfg.downsample}x "
                       f"downsampling) does not fit the {cfg.family} transformer ({cfg.in_channels}-channel tokens; "
                       "tokens must be 16 px)")
    self.cfg, self.vae, self.batch_size = cfg, vae, batch_size
    self.mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
    self.devices = self.mesh.devices.size
    replicated = NamedSharding(self.mesh, P())
    self.state = jax.device_put(nnx.state(model), replicated)
    self.vae_graph, vae_state = nnx.split(vae)
    self.vae_state = jax.device_put(vae_state, replicated)
    self.packer = SparsePacker(cfg, ladder, max_refs)
    self.sample = ProgramCache(make_sampler(model), "sample")
    self.encode = ProgramCache(lambda s, x: encode_tokens(nnx.merge(self.vae_graph, s), x), "encode")
    self.decode = ProgramCache(lambda s, t, *, h, w: decode_tokens(nnx.merge(self.vae_graph, s), t, h, w), "decode")

  def programs(self) -> list[dict]:
    return [{"program": cache.name, "signature": str(k[1])[:200], "compile_seconds": round(v, 3)}
            for cache in (self.encode, self.packer.programs, self.packer.budget_programs, self.sample, self.decode)
            for k, v in cache.compile_seconds.items()]

  # ---- per job ------------------------------------------------------------------------------------------------
  def prepare(self, job: Job) -> Prepared:
    H, W = job.size
    n = (H // 16) * (W // 16)
    refs = []
    for pixels, mask in zip(job.references, job.masks):
      tokens = self.encode(self.vae_state, jnp.asarray(pixels[None]))
      refs.append(Reference(tokens, (H, W), pixels=pixels[None], mask=None if mask is None else mask[None]))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(job.seed), (n, self.cfg.in_channels), jnp.float32))
    request = SparseRequest(job.strategy, keep=job.keep, tau=job.tau, hybrid_base=job.hybrid_base, seed=job.seed)
    packed = self.packer(noise[None], (H, W), refs, request)
    return Prepared(job, noise, np.asarray(packed.img[0]), np.asarray(packed.img_ids[0]),
                    int(packed.img_lengths[0]), packed.bucket, packed.kept[0].tolist())

  # ---- per batch ----------------------------------------------------------------------------------------------
  def _shard(self, x):
    return None if x is None else jax.device_put(x, NamedSharding(self.mesh, P("data")))

  def run_batch(self, batch: list[Prepared]) -> list[Result]:
    """Jobs of one shape and bucket, padded with copies of the last job to the full batch size (rounded up to a
    multiple of the device count), so a short last batch reuses the same compiled program."""
    full = -(-self.batch_size // self.devices) * self.devices
    pad = batch + [batch[-1]] * (full - len(batch))
    first = batch[0].job
    H, W = first.size
    n = (H // 16) * (W // 16)
    stack = lambda f: np.stack([f(p) for p in pad])
    optional = lambda f: None if f(first) is None else np.stack([np.asarray(f(p.job), np.float32) for p in pad])
    cond = Conditioning(
        refs=self._shard(stack(lambda p: p.img[n:])), img_ids=self._shard(stack(lambda p: p.img_ids)),
        img_lengths=self._shard(np.asarray([p.length for p in pad], np.int32)),
        txt=self._shard(stack(lambda p: p.job.txt)), txt_ids=jnp.asarray(text_ids(self.cfg, first.txt.shape[0])),
        y=self._shard(optional(lambda j: j.y)), guidance=self._shard(optional(lambda j: j.guidance)),
        neg_txt=self._shard(optional(lambda j: j.neg_txt)), neg_y=self._shard(optional(lambda j: j.neg_y)))
    scale = self._shard(optional(lambda j: j.cfg))
    sigmas = jnp.asarray(schedule_for(self.cfg, n, first.steps))
    noise = self._shard(stack(lambda p: p.noise))
    t0 = time.perf_counter()
    latents = self.sample(self.state, noise, sigmas, cond, scale)
    pixels = jax.block_until_ready(self.decode(self.vae_state, latents, h=H, w=W))
    seconds = time.perf_counter() - t0
    latents, pixels = np.asarray(latents), _to_uint8(pixels)
    return [Result(p.job, pixels[i], latents[i], p, seconds, len(batch)) for i, p in enumerate(batch)]

  def run(self, jobs: list[Job], progress=None):
    """Yields results batch by batch; jobs are grouped by shape and bucket (sequence length)."""
    prepared = [self.prepare(j) for j in jobs]
    groups: dict[tuple, list[Prepared]] = {}
    for p in prepared:
      groups.setdefault(p.job.shape_key() + (len(p.img),), []).append(p)
    for group in groups.values():
      for i in range(0, len(group), self.batch_size):
        results = self.run_batch(group[i:i + self.batch_size])
        if progress is not None:
          progress.update(len(results))
        yield from results
