"""Input pipeline: reference-pair datasets (tfds ArrayRecord, no tensorflow), grain batches, a synthetic world.

- `manifest`: the JSONL manifest format and row validation (bad rows by line number).
- `images`: any image file -> canonical 8-bit RGB / mask pixels.
- `builder`: the tfds builder, `write_dataset` (atomic), `build_from_manifest`, `open_dataset`.
- `buckets`: aspect-ratio buckets (multiples of 16) and resize + centre-crop.
- `pipeline`: the grain pipeline (sharding, seeded shuffle, repeat, fixed-shape batches, workers, state).
- `world`: procedural reference pairs with exact ground truth for both tasks.
- `precompute`: a dataset -> a latent dataset (ArrayRecord) through pluggable encoders.
"""

from sparse_context_jax.data.buckets import aspect_buckets, resize_crop
from sparse_context_jax.data.builder import (BadManifest, Dataset, ReferencePairs, build_from_manifest,
                                             open_dataset, write_dataset)
from sparse_context_jax.data.images import ImageError, load_image, load_mask
from sparse_context_jax.data.manifest import MAX_REFS, TASKS, BadRow, read_manifest
from sparse_context_jax.data.pipeline import make_pipeline
from sparse_context_jax.data.world import WorldRecords, example, psnr
