"""Input pipeline: reference-pair datasets (tfds ArrayRecord, no tensorflow), grain batches, a synthetic world.

- `manifest`: the JSONL manifest format and row validation (bad rows by line number).
- `images`: any image file -> canonical 8-bit RGB / mask pixels.
- `builder`: the tfds builder, `write_dataset` (atomic), `build_from_manifest`, `open_dataset`.
- `buckets`: aspect-ratio buckets (multiples of 16) and resize + centre-crop.
- `pipeline`: the grain pipeline (sharding, seeded shuffle, repeat, fixed-shape batches, workers, state).
- `latent_pipeline`: the same batches over a `precompute` folder, bucketed by latent shape.
- `world`: procedural reference pairs with exact ground truth for both tasks.
- `precompute`: a dataset -> a latent dataset (ArrayRecord) through pluggable encoders.
- `vae_encoders`: the project's Flax VAE (and the hashed stand-in text) as precompute encoders.
"""

import importlib

# Names import their module on first use (PEP 562), so code that needs one light module (generation's
# `buckets.resize_crop`) does not import tfds and grain with the package.
_EXPORTS = {
    "buckets": ("aspect_buckets", "resize_crop"),
    "builder": ("BadManifest", "Dataset", "ReferencePairs", "build_from_manifest", "open_dataset", "write_dataset"),
    "images": ("ImageError", "load_image", "load_mask"),
    "manifest": ("MAX_REFS", "TASKS", "BadRow", "read_manifest"),
    "pipeline": ("make_pipeline",),
    "latent_pipeline": ("make_latent_pipeline",),
    "world": ("WorldRecords", "example", "psnr"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
