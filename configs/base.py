"""Base fine-tuning config: every key the train program reads, with its default. Other configs override it.

    python -m sparse_context_jax train --config configs/base.py --workdir /tmp/run --config.train.steps=1000

Not meant to run by itself at full size on a laptop: see configs/tiny.py for the local mode.
"""

import ml_collections

from sparse_context_jax.lora import DEFAULT_TARGETS
from sparse_context_jax.parallel.rules import DEFAULT_RULES
from sparse_context_jax.sparse.buckets import DEFAULT_RATIOS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = "flux2-klein-4b"          # model/config.py PRESETS
  c.model.arch = ml_collections.ConfigDict()  # MMDiTConfig fields overriding the preset (tiny models)
  c.model.init = ""                           # a converted checkpoint (`convert` output); "" = random init
  c.model.dtype = "bfloat16"                  # compute dtype
  c.model.param_dtype = "float32"             # master weights and optimizer state
  c.model.scan_layers = True
  c.model.remat = "dots_no_batch"             # none | full | dots | dots_no_batch
  c.model.attention_impl = ""                 # "" (jax default) | xla | cudnn | splash (TPU) | auto

  c.lora = ml_collections.ConfigDict()        # sparse_context_jax/lora: adapters over frozen base weights
  c.lora.rank = 0                             # 0 = full fine-tune; > 0: train only the LoRA factors
  c.lora.alpha = 16.0                         # scale alpha / rank
  c.lora.dropout = 0.0                        # dropout on the adapters' input, in training only (peft's lora_dropout)
  c.lora.targets = DEFAULT_TARGETS            # regexes over Linear module paths (lora.MLP_TARGETS, MODULATION_TARGETS)

  c.mesh = (-1, 1, 1)                         # (data, fsdp, tensor); -1 fills with the remaining devices
  c.sharding_rules = dict(DEFAULT_RULES)      # logical axis -> mesh axis (None = replicated)

  c.data = ml_collections.ConfigDict()
  c.data.path = ""                            # a build-dataset folder; "" = build the synthetic world below
  c.data.world = ml_collections.ConfigDict(dict(count=256, seed=0, size=(64, 64), max_refs=1,
                                                tasks=("editing", "composition")))
  c.data.resolution = 512                     # aspect-bucket area about resolution^2
  c.data.max_refs = 1                         # reference slots per example
  c.data.seed = 0
  c.data.worker_count = 0
  c.data.encoder = "pixels"                   # pixels (stand-in tokens, encoders/pixels.py), or latents: data.path
                                              # is a precompute folder (VAE latents and text embeddings)
  c.data.text = "hashed"                      # hashed (stand-in caption embedding, encoders/hashed_text.py);
                                              # latents: unused (the folder holds the text embeddings)
  c.data.txt_len = 32

  c.objective = ml_collections.ConfigDict()
  c.objective.logit_mean = 0.0                # t = sigmoid(N(mean, std)), then the resolution shift
  c.objective.logit_std = 1.0
  c.objective.shift = True                    # FLUX.1's mu, linear in the target token count
  c.objective.keep_dist = "ladder"            # ladder (uniform over rungs) | uniform (U(low, high), snapped up)
  c.objective.keep_low = 1 / 16
  c.objective.keep_high = 1.0
  c.objective.dense_prob = 0.1                # probability of fully dense references in a step
  c.objective.ladder = DEFAULT_RATIOS
  c.objective.guidance = 1.0                  # guidance-embedder input, for models that have one

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10_000
  c.train.batch_size = 64                     # global, per optimizer step
  c.train.grad_accum = 1                      # micro-batches per step (batch_size / grad_accum each)
  c.train.lr = 1e-5
  c.train.schedule = "cosine"                 # cosine | constant (both after a linear warmup)
  c.train.warmup_steps = 200
  c.train.end_lr_factor = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.weight_decay = 0.01                 # never on norms and biases
  c.train.clip_norm = 1.0
  c.train.ema_decay = 0.0                     # 0 = no EMA

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3

  c.log = ml_collections.ConfigDict()
  c.log.every = 10
  c.log.progress = True
  return c
