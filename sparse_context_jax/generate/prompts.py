"""Text prompts of generation jobs, encoded in batches before any denoising batch.

Every distinct text (prompts and negative prompts) is encoded once, in batches of `batch_size` padded to the full
size, so the text encoder compiles one program per (batch size, sequence length) whatever the jobs file holds.
"""

from __future__ import annotations

import numpy as np

from sparse_context_jax.generate.jobs import BadJob, Job

NO_ENCODER = ("the prompt is text, but no text encoder was given (--text-encoder DIR [DIR], a converted pipeline "
              "as --model, or --random-text-encoder; or give \"prompt_embeds\")")


def encode_job_prompts(jobs: list[Job], encoder, *, max_sequence_length: int,
                       batch_size: int) -> tuple[list[Job], list[BadJob], list[BadJob]]:
  """(jobs with their text prompts encoded, bad jobs, warnings by line). `encoder` is a prompt encoder
  (`encoders.prompts.PromptEncoder`) or None; jobs that already hold embeddings pass through unchanged."""
  todo = [j for j in jobs if j.needs_encoding]
  if not todo:
    return jobs, [], []
  if encoder is None:
    return [j for j in jobs if not j.needs_encoding], [BadJob(j.line, NO_ENCODER) for j in todo], []
  texts = sorted({t for j in todo for t in (j.prompt, j.negative_prompt) if t is not None})
  encoded, cut = {}, set()
  for i in range(0, len(texts), batch_size):
    chunk = texts[i:i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))   # one program for every batch
    emb = encoder(padded, max_sequence_length=max_sequence_length)
    cut.update(t for t, truncated in zip(chunk, emb.truncated) if truncated)
    for b, t in enumerate(chunk):
      encoded[t] = (np.asarray(emb.txt[b], np.float32), None if emb.y is None else np.asarray(emb.y[b], np.float32))
  warnings = [BadJob(j.line, f"{what} is longer than --max-sequence-length {max_sequence_length} tokens: "
                     "truncated") for j in todo for what, t in (("prompt", j.prompt),
                                                                 ("negative_prompt", j.negative_prompt)) if t in cut]
  out = []
  for j in jobs:
    if j.needs_encoding:
      txt, y = encoded[j.prompt]
      neg_txt, neg_y = encoded[j.negative_prompt] if j.negative_prompt is not None else (None, None)
      j = j.with_embeddings(txt, y, neg_txt, neg_y)
    out.append(j)
  return out, [], warnings
