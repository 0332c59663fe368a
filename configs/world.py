"""The main command's model (`python -m sparse_context_jax demo`): a small FLUX.2-shaped model that learns the
synthetic world, both tasks, in about a minute on 2 CPU cores. The demo trains it once through the train program
and caches it; it trains like any config:

    python -m sparse_context_jax train --config configs/world.py --workdir /tmp/world
    python launch/learn_world.py --config configs/world.py --workdir /tmp/learn   # its loss curve and PSNR

The tiny config (configs/tiny.py: hidden 32, 1 double + 1 single block, 64x64 images, 12-channel stand-in pixel
tokens, so the images it makes are 8x8 pooled pixels) trained longer on a larger world, at a constant learning rate
after a short warmup, with two keep-ratio rungs (1/4 and dense) so that only two train steps compile. (Wider
tokens need a wider model: at hidden 32, 48-channel tokens stay noise after 1500 steps.)
"""

from configs import tiny


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/world.py:{arg}: takes no argument")
  c = tiny.get_config("flux2")
  c.data.world.update(count=256)
  c.train.update(steps=3000, batch_size=8, lr=3e-3, schedule="constant", warmup_steps=20)
  c.objective.update(ladder=(0.25, 1.0), keep_low=0.25, dense_prob=0.25)
  c.checkpoint.every = c.train.steps
  c.log.update(every=50, progress=False)
  return c
