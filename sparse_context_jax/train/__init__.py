"""Fine-tuning with random-ratio reference-token dropping.

- `config`: load `configs/FILE.py:ARG`, apply `--config.key=value` overrides, validate before any compile.
- `batches`: pipeline batches -> model batches: pixels through the run's encoders (the local mode's stand-ins), or
  precomputed VAE latents and text embeddings (a `precompute` folder) packed into tokens.
- `objective`: flow matching on the target tokens with randomly thinned, clean references.
- `state`: model, optimizer, shardings of the train state.
- `step`: the jitted, sharded, donated train step (gradient accumulation, EMA).
- `checkpoint`: orbax checkpoints of the whole run (params, optimizer, step, RNG, data iterator, config).
- `metrics`: JSONL metrics and TensorBoard scalars (a resumed run drops the steps it redoes).
- `loop`: the train program (resume checks, SIGTERM / SIGINT saves, the run's outcome).
- `evaluate`: what a run learned: PSNR of targets generated from noise against the synthetic world's truth.
"""
