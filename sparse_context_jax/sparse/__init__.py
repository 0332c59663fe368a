"""Sparse references: task-aware top-k selection of reference tokens in static-shape buckets.

    packer = SparsePacker(cfg)                       # one per model config; caches compiled programs
    x = packer(target_latents, (H, W), [Reference(latents, (h, w), pixels=img)], SparseRequest("edge", keep=0.25))
    out = model(x.img, txt, t, x.img_ids, txt_ids, img_lengths=x.img_lengths)
    velocity = x.target(out)
"""

from sparse_context_jax.sparse.buckets import DEFAULT_RATIOS, BucketLadder
from sparse_context_jax.sparse.compare import Comparison, compare_dense_sparse
from sparse_context_jax.sparse.pack import PackedInputs, Reference, SparsePacker, SparseRequest, dense_inputs
from sparse_context_jax.sparse.scores import STRATEGIES

__all__ = ["BucketLadder", "Comparison", "DEFAULT_RATIOS", "compare_dense_sparse", "PackedInputs", "Reference", "STRATEGIES", "SparsePacker",
           "SparseRequest", "dense_inputs"]
