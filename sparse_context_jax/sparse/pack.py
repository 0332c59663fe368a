"""Packing references: a host-side plan (budgets and a rung of the ladder) and a pure, jittable gather.

Sequence layout: `[target (N) | kept reference tokens | padding]`. Kept tokens keep their dense position ids
(FLUX.1 Kontext `(1, r, c)`, FLUX.2 reference i `(10 + 10 i, r, c, 0)`); dropping is a gather of rows, never a
re-numbering. Padding sits at the end and is excluded through `img_lengths`.

- `pack_references(cfg, latents, scores, budgets, rung)`: the pure gather every caller uses (the train step and
  evaluation trace it; `SparsePacker` compiles it once per (shapes, strategy, rung)). It takes no target tokens.
- `SparsePacker.plan(...)`: validation, budgets (fixed on the host; adaptive through one compiled program) and the
  rung (`BucketLadder.rung`), so the denoiser compiles once per rung.
- `SparsePacker.pack(...)`: plan, then the strategy's scores and the gather in one program, on the device.
- `SparsePacker(...)(target, ...)`: the same with the target in front (`with_target`), for one-off calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_context_jax.model.config import MMDiTConfig
from sparse_context_jax.model.positions import TOKEN_PIXELS, image_ids, reference_index, token_grid
from sparse_context_jax.programs import ProgramCache
from sparse_context_jax.sparse.buckets import BucketLadder, Rung
from sparse_context_jax.sparse.scores import HYBRID_BASES, STRATEGIES, budget_mass, strategy_scores
from sparse_context_jax.sparse.select import adaptive_budget, fixed_budget, top_k


@dataclasses.dataclass(frozen=True)
class SparseRequest:
  """How to thin the references of one batch; validates its own fields (one place).

  Exactly one budget: `keep` (a ratio in (0, 1], or one per reference), `tau` (adaptive: the score mass to keep,
  in (0, 1], clipped to [min_keep, max_keep] of each reference), or `budgets` (token counts per reference).
  `strategy` is one of `scores.STRATEGIES`; `hybrid` spends `grid_share` of the budget on grid coverage and the
  rest on `hybrid_base` scores. `seed` drives `random`. `attention_blocks`: the double blocks whose attention mass
  the `attention` strategy averages (None: `model.attention_mass.default_blocks`); the references then carry that
  mass (`Reference.attention`, computed by `Pipeline.attention_scores` or `model.attention_mass`).
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
  attention_blocks: tuple[int, ...] | None = None

  def __post_init__(self):
    modes = [n for n in ("keep", "tau", "budgets") if getattr(self, n) is not None]
    if len(modes) != 1:
      raise ValueError(f"give exactly one of keep, tau or budgets (got {modes or 'none'})")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy {self.strategy!r} unknown; expected one of {STRATEGIES}")
    if self.hybrid_base not in HYBRID_BASES:
      raise ValueError(f"hybrid_base {self.hybrid_base!r} unknown; expected one of {HYBRID_BASES}")
    for k in self.keeps or ():
      if not 0 < k <= 1:
        raise ValueError(f"keep ratio {k} is outside (0, 1]")
    if self.tau is not None and not 0 < self.tau <= 1:
      raise ValueError(f"tau {self.tau} is outside (0, 1]")
    if not 0 < self.min_keep <= self.max_keep <= 1:
      raise ValueError(f"min_keep {self.min_keep} and max_keep {self.max_keep} must satisfy 0 < min <= max <= 1")
    if not 0 <= self.grid_share <= 1:
      raise ValueError(f"grid_share {self.grid_share} is outside [0, 1]")
    if self.attention_blocks is not None:
      if "attention" not in self.strategies:
        raise ValueError(f"attention_blocks go with the attention strategy, not {self.strategy!r}")
      blocks = tuple(self.attention_blocks)
      if not blocks or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0 for b in blocks):
        raise ValueError(f"attention_blocks={list(blocks)} must be a non-empty list of double-block indices (>= 0)")
      object.__setattr__(self, "attention_blocks", tuple(int(b) for b in blocks))

  @property
  def keeps(self) -> tuple[float, ...] | None:
    """The keep ratios as given (one, or one per reference), or None."""
    if self.keep is None:
      return None
    return tuple(self.keep) if isinstance(self.keep, (tuple, list)) else (self.keep,)

  @property
  def strategies(self) -> set[str]:
    """Every strategy whose scores this request reads (hybrid reads its base too)."""
    return {self.strategy} | ({self.hybrid_base} if self.strategy == "hybrid" else set())

  def static(self) -> dict:
    """What the scores depend on beyond array shapes: a new value compiles a new program."""
    return dict(strategy=self.strategy, hybrid_base=self.hybrid_base, grid_share=float(self.grid_share))


@dataclasses.dataclass
class Reference:
  """One reference image for every example of a batch.

  latents: (B, M, C) packed VAE tokens, M = (H / 16) (W / 16), raster order.
  size: (H, W) in pixels, multiples of 16.
  pixels: (B, H, W, 3) or (B, H, W) image (any value range), needed by `edge`, `saliency`, hybrid on them.
  mask: (B, H, W) pixel mask or (B, H / 16, W / 16) token mask, needed by `mask` (nonzero = inside).
  attention: (B, M) the model's attention mass on each token (`Pipeline.attention_scores`), needed by `attention`.
  """

  latents: jax.Array
  size: tuple[int, int]
  pixels: jax.Array | None = None
  mask: jax.Array | None = None
  attention: jax.Array | None = None

  @property
  def grid(self) -> tuple[int, int]:
    return token_grid(self.size)

  @property
  def tokens(self) -> int:
    return self.grid[0] * self.grid[1]


@dataclasses.dataclass
class Plan:
  """The host-side plan of one packing: per-example budgets (B, R) and the rung that holds them."""

  budgets: np.ndarray
  rung: Rung


@dataclasses.dataclass
class PackedReferences:
  """Kept reference tokens, `[kept tokens of every reference | padding]`, for a batch, on the device."""

  tokens: jax.Array        # (B, rung.slots, C)
  ids: jax.Array           # (B, rung.slots, n_axes)
  lengths: jax.Array       # (B,) int32: kept tokens of the example
  plan: Plan

  @property
  def kept(self) -> np.ndarray:
    """(B, R) kept tokens per example and reference."""
    return self.plan.budgets


@dataclasses.dataclass
class PackedInputs:
  """Model inputs: `model(img, txt, t, img_ids, txt_ids, img_lengths=img_lengths)`; `target(out)` = out[:, :N]."""

  img: jax.Array           # (B, L, C)
  img_ids: jax.Array       # (B, L, n_axes)
  img_lengths: jax.Array   # (B,) int32: N + kept tokens of the example
  n_target: int            # N
  plan: Plan

  @property
  def bucket(self) -> float:
    """The ladder rung (keep ratio of each reference's capacity)."""
    return self.plan.rung.ratio

  @property
  def capacities(self) -> tuple[int, ...]:
    return self.plan.rung.capacities

  @property
  def kept(self) -> np.ndarray:
    return self.plan.budgets

  def target(self, out: jax.Array) -> jax.Array:
    return out[:, :self.n_target]

  @property
  def padding_waste(self) -> float:
    """Share of the reference slots that are padding."""
    return float(1 - self.kept.sum() / (self.kept.shape[0] * sum(self.capacities)))


def check_size(what: str, size) -> tuple[int, int]:
  """(H, W) as ints; ValueError unless two positive multiples of the token size."""
  if len(size) != 2 or any(int(s) <= 0 or int(s) % TOKEN_PIXELS for s in size):
    raise ValueError(f"{what} size {tuple(size)} must be two positive multiples of {TOKEN_PIXELS}")
  return int(size[0]), int(size[1])


# ---- the pure gather ----------------------------------------------------------------------------------------------
def pack_references(cfg: MMDiTConfig, latents: Sequence[jax.Array], scores: Sequence[jax.Array], budgets: jax.Array,
                    rung: Rung) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keeps each reference's best-scored tokens at the rung's capacities. Pure and jittable (`rung` static).

  latents: per reference (B, M_i, C); scores: per reference (B, M_i); budgets: (B, R) int kept tokens, each <= its
  capacity (0 makes the whole reference padding). Returns tokens (B, S, C) and their dense ids (B, S, n_axes),
  S = rung.slots, valid tokens first (each reference's in raster order, references in order), padding zero; and
  lengths (B,) int32, the valid count.
  """
  if not len(latents) == len(scores) == len(rung.grids):
    raise ValueError(f"{len(scores)} score arrays given for {len(latents)} references"
                     if len(scores) != len(latents) else
                     f"{len(latents)} references for a rung of {len(rung.grids)}")
  tokens, ids, valid = [], [], []
  for i, (x, s, grid, cap) in enumerate(zip(latents, scores, rung.grids, rung.capacities)):
    idx, ok = top_k(s, budgets[:, i], cap)
    tokens.append(jnp.take_along_axis(x, idx[..., None], axis=1))
    ids.append(jnp.asarray(image_ids(cfg, *grid, reference_index(cfg, i)))[idx])
    valid.append(ok)
  tokens, ids, valid = (jnp.concatenate(x, axis=1) for x in (tokens, ids, valid))
  perm = jnp.argsort(~valid, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, perm[..., None], axis=1)
  valid = jnp.take_along_axis(valid, perm, axis=1)[..., None]
  lengths = jnp.sum(valid[..., 0], axis=1).astype(jnp.int32)
  return jnp.where(valid, take(tokens), 0), jnp.where(valid, take(ids), 0), lengths


def with_target(cfg: MMDiTConfig, target: jax.Array, target_grid: tuple[int, int], tokens: jax.Array,
                ids: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`[target | packed references]`: img (B, N + S, C), img_ids (B, N + S, n_axes), img_lengths (B,) = N + lengths.
  Pure and jittable; the target keeps the ids of its grid."""
  B, N = target.shape[:2]
  target_ids = jnp.broadcast_to(jnp.asarray(image_ids(cfg, *target_grid)), (B, N, cfg.n_axes))
  img = jnp.concatenate([target.astype(tokens.dtype), tokens], axis=1)
  return img, jnp.concatenate([target_ids, ids], axis=1), (N + lengths).astype(jnp.int32)


def dense_inputs(cfg: MMDiTConfig, target_latents, target_size, references: Sequence[Reference]):
  """The dense sequence `[target | ref_1 | ref_2 | ...]` and its ids `(L, n_axes)`, as the FLUX pipelines build it."""
  ids = [image_ids(cfg, *token_grid(check_size("target", target_size)))]
  ids += [image_ids(cfg, *r.grid, reference_index(cfg, i)) for i, r in enumerate(references)]
  img = jnp.concatenate([jnp.asarray(target_latents)] + [jnp.asarray(r.latents) for r in references], axis=1)
  return img, jnp.asarray(np.concatenate(ids))


# ---- the host side ------------------------------------------------------------------------------------------------
def default_max_refs(cfg: MMDiTConfig) -> int:
  """References a request may have by default: FLUX.1 Kontext takes one, FLUX.2 up to 4."""
  return 1 if cfg.family == "flux1" else 4


class SparsePacker:
  """Plans and packs the references of a batch for one model config (see the module docstring).

  `packer.programs.count` is the number of packing programs compiled so far (scores + gather, one per shapes,
  strategy and rung); `packer.budget_programs` those of adaptive budgets.
  """

  def __init__(self, cfg: MMDiTConfig, ladder: BucketLadder = BucketLadder(), max_refs: int | None = None):
    self.cfg, self.ladder = cfg, ladder
    self.max_refs = default_max_refs(cfg) if max_refs is None else max_refs
    self.programs = ProgramCache(self._scores_and_gather, "pack")
    self.budget_programs = ProgramCache(self._adaptive_budgets, "budgets")
    self.score_programs = ProgramCache(self._all_scores, "scores")

  def plan(self, references: Sequence[Reference], request: SparseRequest) -> tuple[list[dict], Plan]:
    """Validates `references` against the request and the model; returns their device arrays (what the
    strategy reads) and the plan: fixed budgets on the host, adaptive ones through a compiled program."""
    arrays = self._validate(references, request)
    grids = tuple(r.grid for r in references)
    B = arrays[0]["latents"].shape[0]
    if request.tau is not None:
      budgets = np.asarray(self.budget_programs(arrays, jnp.float32(request.tau), grids=grids,
                                                strategy=request.strategy, hybrid_base=request.hybrid_base,
                                                min_keep=float(request.min_keep), max_keep=float(request.max_keep)))
    else:
      if request.budgets is not None:
        per_ref = list(request.budgets)
      else:
        keeps = request.keep if isinstance(request.keep, (tuple, list)) else [request.keep] * len(references)
        per_ref = [fixed_budget(k, r.tokens) for k, r in zip(keeps, references)]
      budgets = np.broadcast_to(np.asarray(per_ref, np.int32), (B, len(references)))
    return arrays, Plan(np.array(budgets), self.ladder.rung(budgets.max(axis=0).tolist(), grids))

  def scores(self, arrays: list[dict], plan: Plan, request: SparseRequest) -> list[jax.Array]:
    """The strategy's (B, M_i) token scores of every reference (`arrays` from `plan`), on the device: for callers
    that gather inside a larger program (generation)."""
    return self.score_programs(arrays, jax.random.PRNGKey(request.seed), grids=plan.rung.grids, **request.static())

  def pack(self, references: Sequence[Reference], request: SparseRequest) -> PackedReferences:
    """The kept tokens of `references` under `request`, on the device (no target)."""
    arrays, plan = self.plan(references, request)
    tokens, ids, lengths = self.programs(arrays, jnp.asarray(plan.budgets), jax.random.PRNGKey(request.seed),
                                         rung=plan.rung, **request.static())
    return PackedReferences(tokens, ids, lengths, plan)

  def __call__(self, target_latents, target_size, references: Sequence[Reference],
               request: SparseRequest) -> PackedInputs:
    """`[target | kept reference tokens | padding]` and its ids and lengths."""
    grid = token_grid(check_size("target", target_size))
    B = target_latents.shape[0]
    if target_latents.shape[1:] != (grid[0] * grid[1], self.cfg.in_channels):
      raise ValueError(f"target latents have shape {tuple(target_latents.shape)}, expected "
                       f"({B}, {grid[0] * grid[1]}, {self.cfg.in_channels}) for a "
                       f"{target_size[0]}x{target_size[1]} target")
    packed = self.pack(references, request)
    img, ids, lengths = with_target(self.cfg, jnp.asarray(target_latents), grid, packed.tokens, packed.ids,
                                    packed.lengths)
    return PackedInputs(img, ids, lengths, target_latents.shape[1], packed.plan)

  def _validate(self, references, request) -> list[dict]:
    cfg = self.cfg
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
    B = references[0].latents.shape[0]
    out = []
    for i, r in enumerate(references):
      h, w = check_size(f"reference {i}", r.size)
      if r.latents.shape != (B, r.tokens, cfg.in_channels):
        raise ValueError(f"reference {i} latents have shape {tuple(r.latents.shape)}, expected "
                         f"({B}, {r.tokens}, {cfg.in_channels}) for a {h}x{w} image and batch {B}")
      if request.budgets is not None and not 1 <= request.budgets[i] <= r.tokens:
        raise ValueError(f"budget {request.budgets[i]} for reference {i} is outside [1, {r.tokens}] (its tokens)")
      d = {"latents": jnp.asarray(r.latents)}
      if request.strategies & {"edge", "saliency"}:
        if r.pixels is None:
          raise ValueError(f"strategy {request.strategy!r} needs the pixels of reference {i}")
        if r.pixels.shape[:3] != (B, h, w):
          raise ValueError(f"reference {i} pixels have shape {tuple(r.pixels.shape)}, expected ({B}, {h}, {w}[, 3])")
        d["pixels"] = jnp.asarray(r.pixels)
      if "mask" in request.strategies:
        if r.mask is None:
          raise ValueError(f"strategy {request.strategy!r} needs a mask for reference {i}")
        if tuple(r.mask.shape) not in ((B, h, w), (B, *r.grid)):
          raise ValueError(f"reference {i} mask has shape {tuple(r.mask.shape)}, expected ({B}, {h}, {w}) "
                           f"or ({B}, {r.grid[0]}, {r.grid[1]})")
        d["mask"] = jnp.asarray(r.mask)
      if "attention" in request.strategies:
        if r.attention is None:
          raise ValueError(f"strategy {request.strategy!r} needs the attention mass of reference {i} "
                           "(Pipeline.attention_scores)")
        if tuple(r.attention.shape) != (B, r.tokens):
          raise ValueError(f"reference {i} attention mass has shape {tuple(r.attention.shape)}, expected "
                           f"({B}, {r.tokens})")
        d["attention"] = jnp.asarray(r.attention)
      out.append(d)
    return out

  # ---- jitted programs ---------------------------------------------------------------------------------------
  @staticmethod
  def _all_scores(refs, key, *, grids, strategy, hybrid_base, grid_share):
    keys = jax.random.split(key, len(refs))
    return [strategy_scores(strategy, r, g, k, hybrid_base, grid_share) for r, g, k in zip(refs, grids, keys)]

  def _scores_and_gather(self, refs, budgets, key, *, rung, strategy, hybrid_base, grid_share):
    scores = self._all_scores(refs, key, grids=rung.grids, strategy=strategy, hybrid_base=hybrid_base,
                              grid_share=grid_share)
    return pack_references(self.cfg, [r["latents"] for r in refs], scores, budgets, rung)

  @staticmethod
  def _adaptive_budgets(refs, tau, *, grids, strategy, hybrid_base, min_keep, max_keep):
    budgets = []
    for r, g in zip(refs, grids):
      m = g[0] * g[1]
      budgets.append(adaptive_budget(budget_mass(strategy, r, g, hybrid_base), tau, fixed_budget(min_keep, m),
                                     fixed_budget(max_keep, m)))
    return jnp.stack(budgets, axis=1)
