"""Jit-compiled batch generation with sparse references: JSONL jobs in, PNGs and a JSON report out."""

from sparse_context_jax.generate.engine import Generator, Prepared, Result
from sparse_context_jax.generate.jobs import BadJob, Job, read_jobs

__all__ = ["BadJob", "Generator", "Job", "Prepared", "Result", "read_jobs"]
