"""The main command's model (`python -m sparse_context_jax demo`): a small FLUX.2-shaped model that learns the
synthetic world, both tasks, in about two minutes on 2 CPU cores. The demo trains it once through the train program
and caches it; it trains like any config:

    python -m sparse_context_jax train --config configs/world.py --workdir /tmp/world
    python launch/learn_world.py --config configs/world.py --workdir /tmp/learn   # its loss curve and PSNR

The tiny config's tokens and images (configs/tiny.py: 64x64 images, 12-channel stand-in pixel tokens, so the images
it makes are 8x8 pooled pixels; 18 text positions, the longest 2-reference caption) with a larger model (4 heads of
16: hidden 64; 2 double + 2 single blocks), trained longer on a larger world (2048 examples) with a cosine
learning-rate decay after a short warmup. Mostly dense references: a step drops to keep 1/4 (random tokens) with
probability 0.1, so that only two train steps compile and sparse references do not cost the dense model its edits.

Measured with launch/learn_world.py (3000 steps, 64 held-out examples, PSNR in dB for editing / composition, dense
references unless said; copying the first reference scores 22.41 / 13.84, the mean training target 16.28 / 16.58):
- the earlier setting (8 text positions, keep 1/4 on 37.5% of the steps): 21.73 / 18.59. Eight positions cut
  every 2-reference caption after its first subject;
- 20 text positions (constant rate): 21.62 / 23.63; with the edited shape's colour in the caption ("make the blue
  circle red"): 22.00 / 23.76; with the cosine decay: 22.51 / 23.71;
- dense references only: 26.59 / 23.77, but 16.11 / 20.41 at keep 1/4 (random tokens);
- keep 1/4 on 10% of the steps: 25.39 / 24.77, and 19.22 / 22.89 at keep 1/4 (this config); 2500 steps 24.04 /
  24.06;
- 48-channel tokens (16x16 pooled pixels, 20 text positions, constant rate): 19.52 / 20.83 (wider tokens need a
  wider model).
"""

from configs import tiny


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/world.py:{arg}: takes no argument")
  c = tiny.get_config("flux2")
  c.model.arch.update(num_heads=4, depth_double=2, depth_single=2)
  c.data.world.update(count=2048)
  c.train.update(steps=3000, batch_size=8, lr=3e-3, schedule="cosine", warmup_steps=20)
  c.objective.update(ladder=(0.25, 1.0), keep_low=0.25, dense_prob=0.8)
  c.checkpoint.every = c.train.steps
  c.log.update(every=50, progress=False)
  return c
