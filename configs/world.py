"""The main command's model (`python -m sparse_context_jax demo`): a small FLUX.2-shaped model that learns the
synthetic world, both tasks, in about a minute on 2 CPU cores. The demo trains it once through the train program
and caches it; it trains like any config:

    python -m sparse_context_jax train --config configs/world.py --workdir /tmp/world
    python launch/learn_world.py --config configs/world.py --workdir /tmp/learn   # its loss curve and PSNR

The tiny config's tokens and images (configs/tiny.py: 64x64 images, 12-channel stand-in pixel tokens, so the images
it makes are 8x8 pooled pixels) with a larger model (4 heads of 16: hidden 64; 2 double + 2 single blocks), trained
longer on a larger world (2048 examples) with a cosine learning-rate decay after a short warmup, and two keep-ratio
rungs (1/4 and dense) so that only two train steps compile. Measured with launch/learn_world.py (3000 steps, 64
held-out examples, dense references, PSNR in dB for editing / composition; copying the first reference scores
22.41 / 13.84, the mean training target 16.28 / 16.58): the tiny model on 256 examples at a constant rate
19.03 / 17.36; 2048 examples 19.32 / 17.93; 4 heads 20.34 / 18.11; 2+2 blocks 20.52 / 17.66; head_dim 32 with
RoPE axes of 8 19.14 / 17.87; all of 4 heads, 2+2 blocks, 2048 examples and the cosine decay 21.73 / 18.59 (this
config). Editing still loses to copying the reference by 0.7 dB. (Wider tokens need a wider model: at hidden 32,
48-channel tokens stay noise after 1500 steps.)
"""

from configs import tiny


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/world.py:{arg}: takes no argument")
  c = tiny.get_config("flux2")
  c.model.arch.update(num_heads=4, depth_double=2, depth_single=2)
  c.data.world.update(count=2048)
  c.train.update(steps=3000, batch_size=8, lr=3e-3, schedule="cosine", warmup_steps=20)
  c.objective.update(ladder=(0.25, 1.0), keep_low=0.25, dense_prob=0.25)
  c.checkpoint.every = c.train.steps
  c.log.update(every=50, progress=False)
  return c
