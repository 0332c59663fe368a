"""From (target size, reference latents and images, strategy, keep ratio or tau) to model inputs.

Sequence layout (method.md 2.1): `[target (N) | kept reference tokens | padding]`. Kept tokens keep their dense
position ids (FLUX.1 Kontext `(1, r, c)`, FLUX.2 reference i `(10 + 10 i, r, c, 0)`); dropping is a gather of rows,
never a re-numbering. Padding sits at the end and is excluded through `img_lengths`.

The host picks the bucket (so the denoiser compiles once per rung); scoring, top-k and the gather run in one
jitted program per (shapes, strategy, bucket), counted by `SparsePacker.programs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.positions import image_ids, reference_index
from sparse_context_jax.programs import ProgramCache
from sparse_context_jax.sparse import scores as S
from sparse_context_jax.sparse.buckets import BucketLadder
from sparse_context_jax.sparse.select import adaptive_budget, fixed_budget, top_k


@dataclasses.dataclass(frozen=True)
class SparseRequest:
  """How to thin the references of one batch.

  Exactly one budget: `keep` (a ratio in (0, 1], or one per reference), `tau` (adaptive: the score mass to keep,
  in (0, 1], clipped to [min_keep, max_keep] of each reference), or `budgets` (token counts per reference).
  `strategy` is one of `scores.STRATEGIES`; `hybrid` spends `grid_share` of the budget on grid coverage and the
  rest on `hybrid_base` scores. `seed` drives `random`.
  """

  strategy: str = "random"
  keep: float | tuple[float, ...] | None = None
  tau: float | None = None
  budgets: tuple[int, ...] | None = None
  min_keep: float = 1 / 16
  max_keep: float = 1.0
  hybrid_base: str = "edge"
  grid_share: float = 0.25
  seed: int = 0

  def __post_init__(self):
    modes = [n for n in ("keep", "tau", "budgets") if getattr(self, n) is not None]
    if len(modes) != 1:
      raise ValueError(f"give exactly one of keep, tau or budgets (got {modes or 'none'})")
    if self.strategy not in S.STRATEGIES:
      raise ValueError(f"strategy {self.strategy!r} unknown; expected one of {S.STRATEGIES}")
    if self.hybrid_base not in S.HYBRID_BASES:
      raise ValueError(f"hybrid_base {self.hybrid_base!r} unknown; expected one of {S.HYBRID_BASES}")
    keeps = self.keep if isinstance(self.keep, (tuple, list)) else [self.keep] if self.keep is not None else []
    for k in keeps:
      if not 0 < k <= 1:
        raise ValueError(f"keep ratio {k} is outside (0, 1]")
    if self.tau is not None and not 0 < self.tau <= 1:
      raise ValueError(f"tau {self.tau} is outside (0, 1]")
    if not 0 < self.min_keep <= self.max_keep <= 1:
      raise ValueError(f"min_keep {self.min_keep} and max_keep {self.max_keep} must satisfy 0 < min <= max <= 1")
    if not 0 <= self.grid_share <= 1:
      raise ValueError(f"grid_share {self.grid_share} is outside [0, 1]")


@dataclasses.dataclass
class Reference:
  """One reference image for every example of a batch.

  latents: (B, M, C) packed VAE tokens, M = (H / 16) (W / 16), raster order.
  size: (H, W) in pixels, multiples of 16.
  pixels: (B, H, W, 3) or (B, H, W) image (any value range), needed by `edge`, `saliency`, hybrid on them.
  mask: (B, H, W) pixel mask or (B, H / 16, W / 16) token mask, needed by `mask` (nonzero = inside).
  """

  latents: jax.Array
  size: tuple[int, int]
  pixels: jax.Array | None = None
  mask: jax.Array | None = None

  @property
  def grid(self) -> tuple[int, int]:
    return self.size[0] // 16, self.size[1] // 16

  @property
  def tokens(self) -> int:
    return self.grid[0] * self.grid[1]


@dataclasses.dataclass
class PackedInputs:
  """Model inputs: `model(img, txt, t, img_ids, txt_ids, img_lengths=img_lengths)`; `target(out)` = out[:, :N]."""

  img: jax.Array           # (B, L, C)
  img_ids: jax.Array       # (B, L, n_axes)
  img_lengths: jax.Array   # (B,) int32: N + kept tokens of the example
  n_target: int            # N
  bucket: float            # ladder rung (keep ratio of each reference's capacity)
  capacities: tuple[int, ...]   # slots per reference at that rung
  kept: np.ndarray         # (B, R) kept tokens per example and reference

  def target(self, out: jax.Array) -> jax.Array:
    return out[:, :self.n_target]

  @property
  def padding_waste(self) -> float:
    """Share of the reference slots that are padding."""
    return float(1 - self.kept.sum() / (self.kept.shape[0] * sum(self.capacities)))


def _check_size(what: str, size) -> tuple[int, int]:
  if len(size) != 2 or any(int(s) <= 0 or int(s) % 16 for s in size):
    raise ValueError(f"{what} size {tuple(size)} must be two positive multiples of 16 (pixels)")
  return int(size[0]), int(size[1])


def _ref_scores(strategy: str, ref: dict, grid: tuple[int, int], key, hybrid_base: str, grid_share: float):
  batch = ref["latents"].shape[0]
  if strategy == "random":
    return S.random_scores(key, batch, grid)
  if strategy == "grid":
    return S.grid_scores(batch, grid)
  if strategy == "edge":
    return S.edge_scores(ref["pixels"], grid)
  if strategy == "saliency":
    return S.saliency_scores(ref["pixels"], grid)
  if strategy == "mask":
    return S.mask_scores(ref["mask"], grid)
  base = _ref_scores(hybrid_base, ref, grid, key, hybrid_base, grid_share)
  return S.hybrid_scores(base, grid, grid_share)


def _ref_mass(strategy: str, ref: dict, grid: tuple[int, int]):
  """What an adaptive budget measures: the information of each token (uniform for random and grid, so tau acts as
  a keep ratio; the mask's coverage, not its ranking scores)."""
  if strategy in ("edge", "saliency"):
    return _ref_scores(strategy, ref, grid, None, strategy, 0.0)
  if strategy == "mask":
    return S.mask_coverage(ref["mask"], grid)
  return jnp.ones((ref["latents"].shape[0], grid[0] * grid[1]), jnp.float32)


class SparsePacker:
  """Builds padded, bucketed model inputs from a target and its references (see the module docstring).

  `packer(target_latents, target_size, references, request)` -> `PackedInputs`. `packer.programs.count` is the
  number of packing programs compiled so far.
  """

  def __init__(self, cfg: MMDiTConfig, ladder: BucketLadder = BucketLadder(), max_refs: int | None = None):
    self.cfg, self.ladder = cfg, ladder
    self.max_refs = (1 if cfg.family == "flux1" else 4) if max_refs is None else max_refs
    self.programs = ProgramCache(self.pack_traced, "pack")
    self.budget_programs = ProgramCache(self._adaptive_budgets, "budgets")

  # ---- host side -------------------------------------------------------------------------------------------
  def __call__(self, target_latents, target_size, references: Sequence[Reference], request: SparseRequest):
    refs = self._validate(target_latents, target_size, references, request)
    tokens = [r.tokens for r in references]
    B = target_latents.shape[0]
    if request.tau is not None:
      budgets = np.asarray(self.budget_programs(refs, self._key(request), jnp.float32(request.tau),
                                                **self._static(references, request),
                                                min_keep=float(request.min_keep), max_keep=float(request.max_keep)))
    else:
      if request.budgets is not None:
        per_ref = list(request.budgets)
      else:
        keeps = request.keep if isinstance(request.keep, (tuple, list)) else [request.keep] * len(references)
        per_ref = [fixed_budget(k, m) for k, m in zip(keeps, tokens)]
      budgets = np.broadcast_to(np.asarray(per_ref, np.int32), (B, len(references)))
    bucket = self.ladder.bucket_for(budgets.max(axis=0).tolist(), tokens)
    capacities = self.ladder.capacities(bucket, tokens)
    img, ids, lengths = self.programs(jnp.asarray(target_latents), refs, jnp.asarray(budgets), self._key(request),
                                      target_grid=(target_size[0] // 16, target_size[1] // 16),
                                      capacities=capacities, **self._static(references, request))
    return PackedInputs(img, ids, lengths, target_latents.shape[1], bucket, capacities, np.array(budgets))

  def _validate(self, target_latents, target_size, references, request) -> list[dict]:
    cfg = self.cfg
    th, tw = _check_size("target", target_size)
    B = target_latents.shape[0]
    if target_latents.shape[1:] != ((th // 16) * (tw // 16), cfg.in_channels):
      raise ValueError(f"target latents have shape {tuple(target_latents.shape)}, expected "
                       f"({B}, {(th // 16) * (tw // 16)}, {cfg.in_channels}) for a {th}x{tw} target")
    if not references:
      raise ValueError("no reference images given")
    if len(references) > self.max_refs:
      raise ValueError(f"{len(references)} references given; this packer is configured for at most {self.max_refs}"
                       + (" (FLUX.1 Kontext takes one reference)" if cfg.family == "flux1" else ""))
    n_keep = len(request.keep) if isinstance(request.keep, (tuple, list)) else None
    n_budgets = len(request.budgets) if request.budgets is not None else None
    for n, what in ((n_keep, "keep ratios"), (n_budgets, "budgets")):
      if n is not None and n != len(references):
        raise ValueError(f"{n} {what} given for {len(references)} references")
    out = []
    for i, r in enumerate(references):
      h, w = _check_size(f"reference {i}", r.size)
      if r.latents.shape != (B, r.tokens, cfg.in_channels):
        raise ValueError(f"reference {i} latents have shape {tuple(r.latents.shape)}, expected "
                         f"({B}, {r.tokens}, {cfg.in_channels}) for a {h}x{w} image and batch {B}")
      if request.budgets is not None and not 1 <= request.budgets[i] <= r.tokens:
        raise ValueError(f"budget {request.budgets[i]} for reference {i} is outside [1, {r.tokens}] (its tokens)")
      needs = {request.strategy} | ({request.hybrid_base} if request.strategy == "hybrid" else set())
      d = {"latents": jnp.asarray(r.latents)}
      if needs & {"edge", "saliency"}:
        if r.pixels is None:
          raise ValueError(f"strategy {request.strategy!r} needs the pixels of reference {i}")
        if r.pixels.shape[:3] != (B, h, w):
          raise ValueError(f"reference {i} pixels have shape {tuple(r.pixels.shape)}, expected ({B}, {h}, {w}[, 3])")
        d["pixels"] = jnp.asarray(r.pixels)
      if "mask" in needs:
        if r.mask is None:
          raise ValueError(f"strategy {request.strategy!r} needs a mask for reference {i}")
        if tuple(r.mask.shape) not in ((B, h, w), (B, h // 16, w // 16)):
          raise ValueError(f"reference {i} mask has shape {tuple(r.mask.shape)}, expected ({B}, {h}, {w}) "
                           f"or ({B}, {h // 16}, {w // 16})")
        d["mask"] = jnp.asarray(r.mask)
      out.append(d)
    return out

  @staticmethod
  def _key(request: SparseRequest) -> jax.Array:
    return jax.random.PRNGKey(request.seed)

  def _static(self, references, request) -> dict:
    """What the scores depend on beyond array shapes (a new value compiles a new program)."""
    return dict(grids=tuple(r.grid for r in references), strategy=request.strategy,
                hybrid_base=request.hybrid_base, grid_share=float(request.grid_share))

  # ---- jitted programs ---------------------------------------------------------------------------------------
  def _all_scores(self, refs, key, grids, strategy, hybrid_base, grid_share):
    keys = jax.random.split(key, len(refs))
    return [_ref_scores(strategy, r, g, k, hybrid_base, grid_share) for r, g, k in zip(refs, grids, keys)]

  def _adaptive_budgets(self, refs, key, tau, *, grids, strategy, hybrid_base, grid_share, min_keep, max_keep):
    del key, grid_share
    if strategy == "hybrid":   # the budget follows the information of the base scores, not the merged order
      strategy = hybrid_base
    budgets = []
    for r, g in zip(refs, grids):
      m = g[0] * g[1]
      budgets.append(adaptive_budget(_ref_mass(strategy, r, g), tau, fixed_budget(min_keep, m),
                                     fixed_budget(max_keep, m)))
    return jnp.stack(budgets, axis=1)

  def pack_traced(self, target, refs, budgets, key, *, target_grid, capacities, grids, strategy="random",
                  hybrid_base="edge", grid_share=0.25, scores=None):
    """The jittable core, for callers that trace packing into a larger program (the train step).

    target (B, N, C); refs: list of dicts with "latents" (B, M_i, C) (and "pixels" / "mask" as the strategy
    needs); budgets (B, R) int32 kept tokens, each <= its capacity (0 makes the whole reference padding); key: PRNG
    key of `random`; static: the target grid, per-reference capacities and grids, the strategy options.
    scores: optional list of (B, M_i) token scores, one per reference, used instead of the strategy's (then `key`
    and the strategy options are unused): the train step draws its random scores for the whole batch before
    splitting it into micro-batches, so the tokens an example keeps do not depend on the micro-batching.
    Returns img (B, N + sum(capacities), C), img_ids, img_lengths (B,).
    """
    cfg, B, N = self.cfg, target.shape[0], target.shape[1]
    if scores is None:
      scores = self._all_scores(refs, key, grids, strategy, hybrid_base, grid_share)
    elif len(scores) != len(refs):
      raise ValueError(f"{len(scores)} score arrays given for {len(refs)} references")
    tokens, ids, valid = [], [], []
    for i, (r, g, s, cap) in enumerate(zip(refs, grids, scores, capacities)):
      idx, ok = top_k(s, budgets[:, i], cap)
      tokens.append(jnp.take_along_axis(r["latents"], idx[..., None], axis=1))
      ids.append(jnp.asarray(image_ids(cfg, *g, reference_index(cfg, i)))[idx])
      valid.append(ok)
    tokens, ids, valid = (jnp.concatenate(x, axis=1) for x in (tokens, ids, valid))
    # Valid tokens of all references first (each reference's in raster order, references in order), padding last.
    perm = jnp.argsort(~valid, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, perm[..., None], axis=1)
    valid = jnp.take_along_axis(valid, perm, axis=1)[..., None]
    tokens, ids = jnp.where(valid, take(tokens), 0), jnp.where(valid, take(ids), 0)
    target_ids = jnp.broadcast_to(jnp.asarray(image_ids(cfg, *target_grid)), (B, N, cfg.n_axes))
    img = jnp.concatenate([target.astype(tokens.dtype), tokens], axis=1)
    img_ids = jnp.concatenate([target_ids, ids], axis=1)
    return img, img_ids, (N + jnp.sum(valid[..., 0], axis=1)).astype(jnp.int32)


def dense_inputs(cfg: MMDiTConfig, target_latents, target_size, references: Sequence[Reference]):
  """The dense sequence `[target | ref_1 | ref_2 | ...]` and its ids `(L, n_axes)`, as the FLUX pipelines build it."""
  th, tw = _check_size("target", target_size)
  ids = [image_ids(cfg, th // 16, tw // 16)]
  ids += [image_ids(cfg, *r.grid, reference_index(cfg, i)) for i, r in enumerate(references)]
  img = jnp.concatenate([jnp.asarray(target_latents)] + [jnp.asarray(r.latents) for r in references], axis=1)
  return img, jnp.asarray(np.concatenate(ids))
