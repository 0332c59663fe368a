"""The Flax text encoders equal their transformers references on tiny random fp32 models: every hidden state of
Qwen3 / Mistral / Mistral3's language model, T5's and CLIP's last hidden state and CLIP's pooled vector, with right
padding of several lengths."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import text_reference as ref
from sparse_context_jax.text import DecoderConfig, T5EncoderConfig
from sparse_context_jax.text.t5 import relative_position_buckets

# (lengths of the prompts, padded width): several lengths, right padding, one unpadded prompt.
BATCHES = [((11, 7, 2), 11), ((5,), 5), ((9, 13), 16)]


def _torch_hidden_states(tm, ids, mask):
  with torch.no_grad():
    out = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", ref.DECODERS)
def test_decoder_hidden_states_equal_transformers(name):
  model = ref.jax_model(name)
  for i, (lengths, width) in enumerate(BATCHES):
    ids, mask = ref.prompts(lengths, width, seed=i)
    expected = _torch_hidden_states(ref.torch_model(name), ids, mask)
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == (len(expected), *expected[0].shape)
    errs = [ref.rel_err(g, e) for g, e in zip(got, expected)]
    print(f"{name} {lengths}: per hidden state relative error {[f'{e:.1e}' for e in errs]}")
    assert max(errs) <= 1e-5


def test_decoder_config_fields_follow_the_family():
  qwen = ref.jax_model("qwen3-causal-lm").config
  mistral = ref.jax_model("mistral-causal-lm").config
  mistral3 = ref.jax_model("mistral3").config
  assert qwen.qk_norm and not mistral.qk_norm and not mistral3.qk_norm
  assert (qwen.head_dim, qwen.num_heads, qwen.num_kv_heads, qwen.rope_theta) == (16, 4, 2, 1e6)
  assert mistral.sliding_window == 4 and mistral3.sliding_window is None and mistral3.rope_theta == 1e9
  assert ref.jax_model("qwen3-model").config.attention_bias
  assert DecoderConfig.from_dict(qwen.to_dict()) == qwen


def test_selected_hidden_states_and_the_final_norm():
  """`hidden_states=(k, ...)` returns those indices only; the last index of a full model is after the final norm
  (as transformers 5), every earlier one before it."""
  name = "qwen3-causal-lm"
  model = ref.jax_model(name)
  ids, mask = ref.prompts((8, 5), 8, seed=3)
  expected = _torch_hidden_states(ref.torch_model(name), ids, mask)
  with torch.no_grad():
    last = ref.torch_model(name).model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  np.testing.assert_allclose(expected[-1], last.last_hidden_state.numpy())
  got = model(jnp.asarray(ids), jnp.asarray(mask), hidden_states=(3, 1, 0))
  for g, k in zip(got, (3, 1, 0)):
    assert ref.rel_err(g, expected[k]) <= 1e-5
  with pytest.raises(ValueError, match="indices 0..3"):
    model(jnp.asarray(ids), jnp.asarray(mask), hidden_states=(4,))


@pytest.mark.parametrize("name", ["qwen3-causal-lm", "mistral3"])
def test_layer_cut_equals_the_full_models_hidden_state(name):
  """A model built with only the first k layers gives hidden state k of the full model (before the final norm),
  holds no parameters of the later layers and no final norm; scanned and unrolled agree."""
  full = ref.jax_model(name)
  ids, mask = ref.prompts((9, 4, 6), 9, seed=5)
  expected = full(jnp.asarray(ids), jnp.asarray(mask))
  for k in (2, 1, 0):
    for scan in (True, False):
      cut = ref.jax_model(name, num_layers=k, scan_layers=scan)
      assert cut.final_norm is None and (cut.layers is None) == (k == 0)
      if k:
        assert cut.layers.q.kernel.shape[0] == k
      got = cut(jnp.asarray(ids), jnp.asarray(mask), hidden_states=(k,))[0]
      assert ref.rel_err(got, expected[k]) <= 1e-6


@pytest.mark.parametrize("name", ["t5-v1_1", "t5-relu"])
def test_t5_equals_transformers(name):
  model, tm = ref.jax_model(name), ref.torch_model(name)
  for i, (lengths, width) in enumerate(BATCHES):
    ids, mask = ref.prompts(lengths, width, seed=10 + i)
    for m in (mask, None):   # FLUX.1 gives T5 no mask
      with torch.no_grad():
        expected = tm(input_ids=torch.from_numpy(ids),
                      attention_mask=None if m is None else torch.from_numpy(m)).last_hidden_state.numpy()
      got = model(jnp.asarray(ids), None if m is None else jnp.asarray(m))
      err = ref.rel_err(got, expected)
      print(f"{name} {lengths} mask={m is not None}: relative error {err:.1e}")
      assert err <= 1e-5


def test_t5_buckets_equal_transformers_up_to_512_tokens():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
  for buckets, distance in ((32, 128), (8, 12), (16, 40)):
    expected = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets,
                                                     max_distance=distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(512, buckets, distance), expected)


@pytest.mark.parametrize("name", ["clip-legacy-eos", "clip-eos-id"])
def test_clip_equals_transformers(name):
  """Both pooling rules: `eos_token_id == 2` takes argmax(ids), else the first end-of-text token (the prompts are
  padded with it, so "first" matters)."""
  model, tm = ref.jax_model(name), ref.torch_model(name)
  eos = VOCAB_TOP = ref.VOCAB - 1 if tm.config.eos_token_id == 2 else tm.config.eos_token_id
  for i, (lengths, width) in enumerate(BATCHES):
    ids, mask = ref.prompts(lengths, width, seed=20 + i, eos=eos)
    if tm.config.eos_token_id == 2:
      assert (ids.argmax(-1) == np.asarray(lengths) - 1).all() and VOCAB_TOP == ids.max()
    for m in (None, mask):
      with torch.no_grad():
        out = tm(input_ids=torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m))
      got = model(jnp.asarray(ids), None if m is None else jnp.asarray(m))
      errs = (ref.rel_err(got.last_hidden_state, out.last_hidden_state.numpy()),
              ref.rel_err(got.pooler_output, out.pooler_output.numpy()))
      print(f"{name} {lengths} mask={m is not None}: relative error last {errs[0]:.1e}, pooled {errs[1]:.1e}")
      assert max(errs) <= 1e-5


def test_configs_from_transformers_and_back():
  t5 = ref.jax_model("t5-v1_1").config
  assert (t5.dense_act_fn, t5.is_gated_act, t5.relative_attention_num_buckets) == ("gelu_new", True, 8)
  relu = ref.jax_model("t5-relu").config
  assert (relu.dense_act_fn, relu.is_gated_act) == ("relu", False)
  assert T5EncoderConfig.from_json(t5.to_json()) == t5
  clip = ref.jax_model("clip-eos-id").config
  assert (clip.eos_token_id, clip.hidden_act, clip.head_dim) == (ref.VOCAB - 3, "gelu", 16)
  with pytest.raises(ValueError, match="architectures"):
    DecoderConfig.from_transformers({"architectures": ["LlamaForCausalLM"]})
  with pytest.raises(ValueError, match="num_layers=5"):
    DecoderConfig.from_transformers(ref.config_dict(ref.torch_model("qwen3-model")), num_layers=5)


def _float64_reference(name):
  """The torch model in float64. transformers computes RMS norms in float32 and RoPE's cos and sin (of float32
  angles) in float32 whatever the model's dtype; here both run in float64 (of the same float32 angles), as the port
  does in float64."""
  tm = copy.deepcopy(ref.torch_model(name)).double()
  for module in tm.modules():
    if type(module).__name__.endswith("RMSNorm") or type(module).__name__ == "T5LayerNorm":
      def norm(x, module=module):
        return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
      module.forward = norm
  rotary = getattr(getattr(tm, "model", tm), "rotary_emb", None) or getattr(
      getattr(getattr(tm, "model", None), "language_model", None), "rotary_emb", None)
  if rotary is not None:
    def forward(x, position_ids, rotary=rotary):
      freqs = position_ids[..., None].float() * rotary.inv_freq.float()
      emb = torch.cat((freqs, freqs), dim=-1).double()
      return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rotary.forward = forward
  return tm


@pytest.mark.parametrize("name", ["qwen3-causal-lm", "mistral-causal-lm", "t5-v1_1", "clip-eos-id"])
def test_float64_equals_transformers_to_1e12(name):
  tm = _float64_reference(name)
  eos = tm.config.eos_token_id if name.startswith("clip") else None
  ids, mask = ref.prompts((9, 6, 3), 9, seed=30, eos=eos)
  with jax.enable_x64(True):
    model = ref.jax_model(name, dtype=jnp.float64)
    with torch.no_grad():
      out = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    if name.startswith("clip"):
      pairs = [(got.last_hidden_state, out.last_hidden_state), (got.pooler_output, out.pooler_output)]
    elif name.startswith("t5"):
      pairs = [(got, out.last_hidden_state)]
    else:
      pairs = list(zip(got, out.hidden_states))
    errs = [ref.rel_err(np.asarray(g), e.numpy()) for g, e in pairs]
  print(f"{name} float64: max relative error {max(errs):.1e}")
  assert max(errs) <= 1e-12
