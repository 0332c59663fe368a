"""Input pipeline: reference-pair datasets (tfds ArrayRecord, no tensorflow), grain batches, a synthetic world.

- `manifest`: the JSONL manifest format and row validation (bad rows by line number).
- `builder`: the tfds builder, `write_dataset` (atomic), `build_from_manifest`, `open_dataset`.
- `buckets`: aspect-ratio buckets (multiples of 16).
- `pipeline`: the grain pipeline (sharding, seeded shuffle, repeat, fixed-shape batches, workers, state).
- `latent_pipeline`: the same batches over a `precompute` folder, bucketed by latent shape.
- `world`: procedural reference pairs with exact ground truth for both tasks.
- `precompute`: a dataset -> a latent dataset (ArrayRecord) through pluggable encoders (`sparse_context_jax.encoders`).

Image files and resizing (`sparse_context_jax.images`) live outside this package: generation reads images without
the dataset stack (tfds, grain).
"""

from sparse_context_jax.data.buckets import aspect_buckets
from sparse_context_jax.data.builder import (BadManifest, Dataset, ReferencePairs, build_from_manifest, open_dataset,
                                             write_dataset)
from sparse_context_jax.data.latent_pipeline import make_latent_pipeline
from sparse_context_jax.data.manifest import MAX_REFS, TASKS, BadRow, read_manifest
from sparse_context_jax.data.pipeline import make_pipeline
from sparse_context_jax.data.world import WorldRecords, example, psnr

__all__ = ["BadManifest", "BadRow", "Dataset", "MAX_REFS", "ReferencePairs", "TASKS", "WorldRecords",
           "aspect_buckets", "build_from_manifest", "example", "make_latent_pipeline", "make_pipeline",
           "open_dataset", "psnr", "read_manifest", "write_dataset"]
