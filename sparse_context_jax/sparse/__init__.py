"""Sparse references: task-aware top-k selection of reference tokens in static-shape buckets.

    packer = SparsePacker(cfg)                       # one per model config; caches compiled programs
    x = packer(target_latents, (H, W), [Reference(latents, (h, w), pixels=img)], SparseRequest("edge", keep=0.25))
    out = model(x.img, txt, t, x.img_ids, txt_ids, img_lengths=x.img_lengths)
    velocity = x.target(out)

The `attention` strategy ranks by the model's own attention mass, computed first (one dense pass of the first step):
`Reference(latents, (h, w), attention=Pipeline.attention_scores(noise, ...)[i])` (`model/attention_mass.py`).

Inside a larger program (training, evaluation): `BucketLadder.at(ratio, grids)` gives the rung, and
`pack_references` + `with_target` the model inputs.
"""

from sparse_context_jax.sparse.buckets import DEFAULT_RATIOS, BucketLadder, Rung
from sparse_context_jax.sparse.compare import Comparison, compare_dense_sparse
from sparse_context_jax.sparse.pack import (PackedInputs, PackedReferences, Plan, Reference, SparsePacker,
                                            SparseRequest, dense_inputs, pack_references, with_target)
from sparse_context_jax.sparse.scores import STRATEGIES

__all__ = ["BucketLadder", "Comparison", "DEFAULT_RATIOS", "PackedInputs", "PackedReferences", "Plan", "Reference",
           "Rung", "STRATEGIES", "SparsePacker", "SparseRequest", "compare_dense_sparse", "dense_inputs",
           "pack_references", "with_target"]
