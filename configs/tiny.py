"""Local mode: a tiny FLUX.2-shaped model on the synthetic world, on this CPU in seconds per step.

    python -m sparse_context_jax train --config configs/tiny.py --workdir /tmp/tiny
    python -m sparse_context_jax train --config configs/tiny.py:flux1 --workdir /tmp/tiny1   # FLUX.1 layout

Images are 64x64 (4x4 = 16 target tokens), tokens are stand-in pixel tokens (encoders/pixels.py), the text is the
stand-in hashed caption embedding (encoders/hashed_text.py).
"""

from configs import base
from sparse_context_jax.data.world import caption_words


def get_config(arg: str | None = None):
  c = base.get_config()
  family = arg or "flux2"
  presets = {"flux2": "flux2-klein-4b", "flux1": "flux1-kontext-dev"}
  if family not in presets:
    raise ValueError(f"configs/tiny.py:{arg}: the argument is empty, flux2 or flux1")
  c.model.preset = presets[family]
  c.model.arch = dict(in_channels=12, out_channels=12, num_heads=2, head_dim=16, depth_double=1, depth_single=1,
                      context_dim=16, time_channels=32,
                      axes_dims=(4, 4, 4, 4) if family == "flux2" else (4, 6, 6),
                      **({"pooled_dim": 16} if family == "flux1" else {}))
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.world.update(count=64, size=(64, 64), max_refs=1 if family == "flux1" else 2)
  c.data.max_refs = c.data.world.max_refs
  c.data.resolution = 64
  c.data.txt_len = caption_words(c.data.world.max_refs)   # every caption whole: 18 words (9 for flux1)
  c.train.update(steps=60, batch_size=8, lr=1e-3, warmup_steps=5)
  c.checkpoint.every = 20
  c.log.every = 1
  return c
