"""A medium FLUX.2-shaped model for timing the train step on a CPU (launch/bench_train.py); it also trains:

    python launch/bench_train.py --configs tiny medium
    python -m sparse_context_jax train --config configs/medium.py --workdir /tmp/medium

The shape of launch/bench_sparse.py's medium model (klein 9B's layout narrowed to hidden 256 = 2 heads of 128,
2 double + 6 single blocks, 768-wide text features), with 192-channel stand-in pixel tokens (8x8 pooled pixels per
token; klein's latents have 128 channels): 256x256 images (16x16 = 256 tokens each), 2 reference slots, 32 text
tokens, batch 4, float32 and no remat on the CPU. `configs/medium.py:accelerator`: the same depth at klein 4B's
width (hidden 3072), 512x512 images (1024 tokens each), 128 text tokens, batch 8, bfloat16 compute, remat and cuDNN
attention: one GPU.
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config()
  c.model.preset = "flux2-klein-9b"
  c.model.arch = dict(in_channels=192, out_channels=192, num_heads=2, head_dim=128, depth_double=2, depth_single=6,
                      context_dim=768)
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.world.update(count=64, size=(256, 256), max_refs=2)
  c.data.max_refs = 2
  c.data.resolution = 256
  c.data.txt_len = 32
  c.train.update(steps=1000, batch_size=4, lr=3e-4, warmup_steps=50)
  c.checkpoint.every = 100
  if arg == "accelerator":   # klein 4B's width (24 heads of 128, 7680-wide text) at 512 px, bf16, for one GPU
    c.model.arch.update(num_heads=24, context_dim=7680)
    c.model.update(dtype="bfloat16", remat="dots_no_batch", attention_impl="cudnn")
    c.data.world.size = (512, 512)
    c.data.resolution = 512
    c.data.txt_len = 128
    c.train.batch_size = 8
  elif arg:
    raise ValueError(f"configs/medium.py:{arg}: the argument is empty or 'accelerator'")
  return c
