"""Splash attention (the Pallas TPU flash-attention kernel) over the joint sequence, padding keys excluded.

The kernel runs one example at a time with layout (H, S, Dh), needs the sequence to be a multiple of its block and
scales nothing itself. Bucket padding becomes segment ids: every query is in segment 0, a key is in segment 0 when
valid (position < kv_len) and 1 when padding, so padding keys are excluded exactly as `key_value_seq_lengths` does
in the XLA and cuDNN paths. The extra rows that round the sequence up to the block are padding keys too.

Under a mesh (the abstract mesh the train step and the generator trace under), the kernel runs in a `shard_map`:
batch over the data axes, heads over `tensor`; each device holds whole sequences of its heads, so no collective
is needed. Off TPU it runs in Pallas interpret mode (the parity tests, on the CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

LANES = 128                 # the sequence is rounded up to a multiple of this
BLOCKS = (512, 256, 128)    # the largest that divides the rounded sequence is the kernel's q and kv block
BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"


def padded_length(s: int) -> int:
  return -(-s // LANES) * LANES


def _libs():
  """Pallas' splash kernel and mask modules, imported at the first use (their import costs every command, even one
  that never attends, a fifth of a second)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask
  return splash_attention_kernel, splash_attention_mask


@functools.lru_cache(maxsize=None)
def _kernel(seq: int, heads: int, interpret: bool):
  """The kernel for (heads, seq, Dh) inputs of one example: full mask (segment ids do the masking), forward and
  backward blocks of one size."""
  kernel_lib, mask_lib = _libs()
  b = next(b for b in BLOCKS if seq % b == 0)
  sizes = kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((seq, seq))] * heads)
  with jax.ensure_compile_time_eval():   # the block tables are constants: cached, never a trace's tracers
    return kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, kv_segment, *, interpret: bool):
  """(B, S, H, Dh) x3, kv_segment (B, S) -> (B, S, H, Dh) on one device's shard (S already padded)."""
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  q = q * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)

  def one(q, k, v, kv_segment):
    ids = _libs()[0].SegmentIds(q=jnp.zeros_like(kv_segment), kv=kv_segment)
    out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), segment_ids=ids)
    return out.swapaxes(0, 1)

  return jax.vmap(one)(q, k, v, kv_segment)


def _specs(mesh, batch: int, heads: int) -> tuple[PartitionSpec, PartitionSpec]:
  """(q/k/v spec, segment spec): batch over the data axes and heads over `tensor` where the mesh has them and
  they divide the sizes, else replicated."""
  names = dict(zip(mesh.axis_names, mesh.axis_sizes))
  data = tuple(a for a in BATCH_AXES if names.get(a, 1) > 1)
  if batch % math.prod(names[a] for a in data):
    data = ()
  head = HEAD_AXIS if names.get(HEAD_AXIS, 1) > 1 and heads % names[HEAD_AXIS] == 0 else None
  data = data or None
  return PartitionSpec(data, None, head, None), PartitionSpec(data, None)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None) -> jax.Array:
  """Softmax attention, (B, S, H, Dh) each -> (B, S, H, Dh); keys at positions >= kv_len[b] are excluded."""
  B, S, H, _ = q.shape
  seq = padded_length(S)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, seq - S), (0, 0), (0, 0)))
  valid = jnp.full((B,), S, jnp.int32) if kv_len is None else kv_len.astype(jnp.int32)
  kv_segment = (jnp.arange(seq)[None, :] >= valid[:, None]).astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  platform = mesh.abstract_device.platform if not mesh.empty else jax.default_backend()
  local = functools.partial(_local, interpret=platform != "tpu")
  if mesh.empty:
    out = local(pad(q), pad(k), pad(v), kv_segment)
  else:
    x_spec, s_spec = _specs(mesh, B, H)
    out = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, s_spec), out_specs=x_spec,
                        check_vma=False)(pad(q), pad(k), pad(v), kv_segment)
  return out[:, :S]
