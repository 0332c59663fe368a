"""Jit-compiled batch generation with sparse references: JSONL jobs in, PNGs and a JSON report out.

- `pipeline`: the `Pipeline` (model + image and text encoders; encode, select, generate, decode).
- `jobs`: the job format (`read_jobs`, `make_job`).
- `engine`: the `Generator`, batching jobs over a pipeline.
"""

from sparse_context_jax.generate.engine import Failed, Generator, Prepared, Result
from sparse_context_jax.generate.jobs import BadJob, Job, make_job, read_jobs
from sparse_context_jax.generate.pipeline import Pipeline

__all__ = ["BadJob", "Failed", "Generator", "Job", "Pipeline", "Prepared", "Result", "make_job", "read_jobs"]
