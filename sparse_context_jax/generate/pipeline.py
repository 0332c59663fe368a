"""The generation pipeline: a model with its image and text encoders, every step a compiled program.

    pipe = Pipeline(model, VAEImageEncoder(vae))                  # or the local mode's PixelTokens
    tokens = pipe.encode_references(pixels)                       # (B, H, W, 3) in [-1, 1] -> (B, N_ref, C)
    refs = [Reference(tokens, (H, W), pixels=pixels)]
    plan, scores = pipe.select(refs, SparseRequest("edge", keep=0.25))   # budgets + rung (host), scores (device)
    # the "attention" strategy: Reference(..., attention=pipe.attention_scores(noise, ...)[i]) first
    latents = pipe.generate(noise, sigmas, [r.latents for r in refs], scores, plan.budgets, prompt,
                            rung=plan.rung, target_grid=token_grid((H, W)))
    pixels = pipe.decode(latents, (H, W))

`attention_scores` is the `attention` strategy's scoring pass (`model.attention_mass`): one dense forward of the
first double blocks at the first step, one program per shape (the budget is not an input). `generate` is one program
per signature: the gather of the kept reference tokens (`sparse.pack_references`) and the whole denoising loop (the
reference K/V loop when the model's config says `reference_attention="kv"`: the kept reference tokens run at the
first step only). Reference tokens stay on the device from encoding to sampling; only the per-example budgets come
to the host (to pick the rung). `generate(..., params=...)` runs other parameters of
the same model (a training run's). With a mesh, the model's state is replicated on it and `shard` puts batches on
its `data` axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_context_jax.encoders.base import ImageEncoder, PromptEmbeddings, TextEncoder
from sparse_context_jax.model.attention_mass import KEY_BLOCK, attention_mass, resolve_blocks
from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.mmdit import MMDiT
from sparse_context_jax.model.positions import TOKEN_PIXELS, image_ids, reference_index, text_ids
from sparse_context_jax.programs import ModuleProgram
from sparse_context_jax.sampling import Conditioning, denoise
from sparse_context_jax.sparse import BucketLadder, Plan, Reference, Rung, SparsePacker, SparseRequest, pack_references


def conditioning(cfg: MMDiTConfig, tokens, ids, lengths, target_grid: tuple[int, int], prompt: PromptEmbeddings,
                 negative: PromptEmbeddings | None = None, guidance=None) -> Conditioning:
  """What the denoising loop holds constant (pure): the packed references (tokens (B, S, C), ids, lengths (B,)) after
  the target's ids, the prompt (and the negative one for true CFG), the guidance (B,) of guidance-embedded models."""
  B, N = tokens.shape[0], target_grid[0] * target_grid[1]
  target_ids = jnp.broadcast_to(jnp.asarray(image_ids(cfg, *target_grid)), (B, N, cfg.n_axes))
  txt_ids = prompt.txt_ids if prompt.txt_ids is not None else jnp.asarray(text_ids(cfg, prompt.txt.shape[1]))
  return Conditioning(refs=tokens, img_ids=jnp.concatenate([target_ids, ids], axis=1),
                      img_lengths=(N + lengths).astype(jnp.int32), txt=prompt.txt, txt_ids=txt_ids, y=prompt.y,
                      guidance=guidance, neg_txt=None if negative is None else negative.txt,
                      neg_y=None if negative is None else negative.y)


def in_mesh(mesh: Mesh | None, fn):
  """`fn` traced under `mesh` (as an abstract mesh): kernels that shard themselves (model/splash.py) read it."""
  if mesh is None:
    return fn

  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced


def _generate(model: MMDiT, noise, sigmas, latents, scores, budgets, prompt, negative, guidance, cfg_scale, *,
              rung: Rung, target_grid: tuple[int, int]):
  tokens, ids, lengths = pack_references(model.config, latents, scores, budgets, rung)
  cond = conditioning(model.config, tokens, ids, lengths, target_grid, prompt, negative, guidance)
  return denoise(model, noise, sigmas, cond, cfg_scale)


def _attention_scores(model: MMDiT, noise, latents, prompt, sigma, guidance, *, target_grid: tuple[int, int],
                      grids: tuple[tuple[int, int], ...], blocks: tuple[int, ...], key_block: int):
  """Per reference (B, M_i): the attention mass on its tokens at the first step, all references dense."""
  cfg, B, N = model.config, noise.shape[0], noise.shape[1]
  ids = [image_ids(cfg, *target_grid)] + [image_ids(cfg, *g, reference_index(cfg, i)) for i, g in enumerate(grids)]
  img = jnp.concatenate([noise.astype(latents[0].dtype), *latents], axis=1)
  txt_ids = prompt.txt_ids if prompt.txt_ids is not None else jnp.asarray(text_ids(cfg, prompt.txt.shape[1]))
  mass = attention_mass(model, img, prompt.txt, jnp.full((B,), sigma, jnp.float32), jnp.asarray(np.concatenate(ids)),
                        txt_ids, n_target=N, blocks=blocks, key_block=key_block, y=prompt.y, guidance=guidance)
  ends = np.cumsum([N] + [h * w for h, w in grids])
  return [mass[:, a:b] for a, b in zip(ends[:-1], ends[1:])]


class Pipeline:
  """Holds the model (and its encoders) and every compiled program; `programs()` lists their compile times."""

  def __init__(self, model: MMDiT, image: ImageEncoder, text: TextEncoder | None = None, *, mesh: Mesh | None = None,
               ladder: BucketLadder = BucketLadder(), max_refs: int | None = None):
    cfg = model.config
    if image.token_pixels != TOKEN_PIXELS:
      raise ValueError(f"the image encoder {image.name} gives tokens of {image.token_pixels}x{image.token_pixels} "
                       f"pixels; FLUX tokens are {TOKEN_PIXELS}x{TOKEN_PIXELS}")
    if image.token_channels != cfg.in_channels:
      raise ValueError(f"the image encoder {image.name} gives {image.token_channels}-channel tokens; the "
                       f"{cfg.family} transformer reads {cfg.in_channels}-channel tokens")
    self.cfg, self.image, self.text, self.mesh, self.dtype = cfg, image, text, mesh, model.dtype
    self.sampler = ModuleProgram(model, in_mesh(mesh, _generate), "sample")
    self.scorer = ModuleProgram(model, in_mesh(mesh, _attention_scores), "attention")
    if mesh is not None:
      replicated = NamedSharding(mesh, PartitionSpec())
      self.sampler.state = jax.device_put(self.sampler.state, replicated)
      if hasattr(image, "place"):
        image.place(replicated)
    self.scorer.state = self.sampler.state   # one copy of the weights
    self.key_block = KEY_BLOCK
    self.packer = SparsePacker(cfg, ladder, max_refs)

  @property
  def devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.devices.size

  def programs(self) -> list[dict]:
    caches = [self.scorer.programs, self.packer.score_programs, self.packer.budget_programs, self.sampler.programs,
              *getattr(self.image, "programs", [])]
    return [record for cache in caches for record in cache.records()]

  # ---- the steps ----------------------------------------------------------------------------------------------
  def encode_references(self, pixels) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> (B, H W / 256, C) tokens, on the device."""
    return jnp.asarray(self.image.encode(pixels))

  def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
    if self.text is None:
      raise ValueError("this pipeline has no text encoder: give prompt embeddings")
    return self.text(prompts)

  def attention_scores(self, noise, latents, prompt: PromptEmbeddings, sigma, guidance=None, *,
                       target_grid: tuple[int, int], grids, blocks=None, params=None) -> list[jax.Array]:
    """The `attention` strategy's token scores (`Reference.attention`), per reference (B, M_i) float32, on the device.

    noise (B, N, C): the first step's target (the sampling noise); latents: per reference (B, M_i, C), dense;
    prompt: the (positive) prompt; sigma: the first step's sigma; guidance (B,) for guidance-embedded models;
    blocks: double-block indices (None: `attention_mass.default_blocks`). One program per shape and blocks.
    """
    return self.scorer(noise, list(latents), prompt, jnp.float32(sigma), guidance, state=params,
                       target_grid=tuple(target_grid), grids=tuple(tuple(g) for g in grids),
                       blocks=resolve_blocks(self.cfg, blocks), key_block=self.key_block)

  def select(self, references: Sequence[Reference], request: SparseRequest) -> tuple[Plan, list[jax.Array]]:
    """The plan (budgets (B, R) and rung, on the host) and the strategy's token scores (on the device)."""
    arrays, plan = self.packer.plan(references, request)
    return plan, self.packer.scores(arrays, plan, request)

  def generate(self, noise, sigmas, latents, scores, budgets, prompt: PromptEmbeddings,
               negative: PromptEmbeddings | None = None, guidance=None, cfg_scale=None, *, rung: Rung,
               target_grid: tuple[int, int], params=None) -> jax.Array:
    """Kept reference tokens gathered and the whole Euler loop run, noise (B, N, C) -> latents (B, N, C) float32.

    latents / scores: per reference (B, M_i, C) / (B, M_i); budgets (B, R) int (0: the reference is absent);
    prompt / negative: `PromptEmbeddings` of arrays; guidance (B,); cfg_scale: None, a scalar or (B,).
    """
    return self.sampler(noise, sigmas, list(latents), list(scores), budgets, prompt, negative, guidance,
                        cfg_scale, state=params, rung=rung, target_grid=tuple(target_grid))

  def decode(self, tokens, size: tuple[int, int]):
    """(B, N, C) tokens -> (B, H, W, 3) pixels in [-1, 1]."""
    return self.image.decode(tokens, size)

  def shard(self, x):
    """Puts a batch array (leading axis = batch) on the mesh's `data` axis (as it is without a mesh)."""
    if x is None or self.mesh is None:
      return x
    return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))
