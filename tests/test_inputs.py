"""Wrong model inputs fail at trace time with a message naming the argument, its shape and what was expected."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import as_jax, inputs, jax_model


@pytest.mark.parametrize("name, change, message", [
    ("flux1-kontext", lambda x: x.pop("y"), r"y is required \(expected shape \(2, 24\)\)"),
    ("flux1-kontext", lambda x: x.pop("guidance"), r"guidance is required"),
    ("flux2-klein-1ref", lambda x: x.update(guidance=np.ones(2, np.float32)), "no guidance embedder"),
    ("flux2-klein-1ref", lambda x: x.update(y=np.ones((2, 4), np.float32)), "no pooled-vector embedder"),
    ("flux2-klein-1ref", lambda x: x.update(img=x["img"][..., :16]), r"img has shape \(2, 22, 16\), expected \(2, 22, 32\)"),
    ("flux2-klein-1ref", lambda x: x.update(img_ids=x["img_ids"][:, :3]), r"img_ids has shape \(22, 3\)"),
    ("flux2-klein-1ref", lambda x: x.update(timesteps=x["timesteps"][:1]), r"timesteps has shape \(1,\)"),
    ("flux2-klein-1ref", lambda x: x.update(img_lengths=np.ones(2, np.float32)), "img_lengths must be integer"),
])
def test_bad_inputs_are_named(name, change, message):
  x = inputs(name)
  change(x)
  with pytest.raises(ValueError, match=message):
    jax_model(name)(**as_jax(x))
