"""Prompts -> `PromptEmbeddings`, exactly as diffusers' FLUX pipelines build `prompt_embeds`, `text_ids` and
`pooled_prompt_embeds`.

Tokenization runs on the host (`recipes.tokenize`); the text encoders of a recipe then run as ONE compiled program
per (batch size, sequence length), their parameters an argument (`ModuleProgram`), so a new prompt never
recompiles. `load_prompt_encoder` reads `convert` outputs, `random_prompt_encoder` builds a small random encoder of
the right family for a transformer config (with a tiny tokenizer built offline).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_context_jax.encoders.base import PromptEmbeddings
from sparse_context_jax.encoders.recipes import RECIPES, Recipe, Stream, Tokens, check_prompts, tokenize
from sparse_context_jax.programs import ModuleProgram


def text_kind(config) -> str:
  """"qwen3", "mistral", "t5" or "clip": the family of a text-encoder config (by its transformers architecture)."""
  arch = config.architecture
  for prefix, kind in (("Qwen3", "qwen3"), ("Mistral", "mistral"), ("T5", "t5"), ("CLIP", "clip")):
    if arch.startswith(prefix):
      return kind
  raise ValueError(f"text encoder architecture {arch!r} is not one of a FLUX pipeline (Qwen3, Mistral, T5, CLIP)")


def read_stream(stream: Stream, module, input_ids, attention_mask):
  """The features `stream` reads from its encoder: (B, S, len(layers) * hidden) stacked hidden states per token,
  T5's last hidden state (B, S, d_model), or CLIP's pooled vector (B, hidden); float32."""
  mask = attention_mask if stream.attention_mask else None
  if stream.layers:
    h = module(input_ids, mask, hidden_states=stream.layers)   # (K, B, S, D)
    K, B, S, D = h.shape
    out = jnp.transpose(h, (1, 2, 0, 3)).reshape(B, S, K * D)   # per token [h_a | h_b | ...]
  elif stream.output == "y":
    out = module(input_ids, mask).pooler_output
  else:
    out = module(input_ids, mask)
  return out.astype(jnp.float32)


def _run(encoders: nnx.Dict, tokens: dict, *, streams: tuple[Stream, ...]) -> dict:
  return {s.output: read_stream(s, encoders[s.component], *tokens[s.component]) for s in streams}


def text_ids(recipe: Recipe, batch: int, length: int) -> np.ndarray:
  """FLUX.1: (T, 3) float32 zeros. FLUX.2: (B, T, 4) int64 (t, h, w, l) = (0, 0, 0, token index)."""
  if recipe.text_ids == "zeros":
    return np.zeros((length, 3), np.float32)
  ids = np.zeros((batch, length, 4), np.int64)
  ids[..., 3] = np.arange(length)
  return ids


class PromptEncoder:
  """`enc(prompts, max_sequence_length=512) -> PromptEmbeddings` (txt (B, T, context_dim) float32, txt_ids, y
  (B, pooled_dim) or None, truncated per prompt).

  Args:
    recipe: how the pipeline tokenizes and what it reads (`recipes.RECIPES`).
    encoders: component name -> Flax text encoder, one per stream of the recipe.
    tokenizers: component name -> transformers tokenizer.
    name: recorded in run reports.
  """

  def __init__(self, recipe: Recipe, encoders: dict, tokenizers: dict, name: str | None = None):
    needed = {s.component for s in recipe.streams}
    missing = sorted((needed - set(encoders)) | (needed - set(tokenizers)))
    if missing:
      raise ValueError(f"the {recipe.name} recipe needs an encoder and a tokenizer for {missing}")
    for s in recipe.streams:
      kind = text_kind(encoders[s.component].config)
      if kind not in s.kinds:
        raise ValueError(f"{recipe.name}: {s.component} is a {kind} encoder, expected {' or '.join(s.kinds)}")
      check_vocab(tokenizers[s.component], encoders[s.component].config, s.component)
      check_layers(s, encoders[s.component].config, recipe.name, s.component)
    self.recipe, self.tokenizers = recipe, dict(tokenizers)
    self.name = name or f"{recipe.name}-text"
    self.configs = {c: m.config for c, m in encoders.items()}
    self.program = ModuleProgram(nnx.Dict(encoders), functools.partial(_run, streams=recipe.streams), "text")
    self.state = self.program.state

  @property
  def programs(self):
    return self.program.programs

  def place(self, sharding) -> None:
    """Puts the encoders' parameters on `sharding` (e.g. replicated over a mesh)."""
    self.state = jax.device_put(self.state, sharding)

  def tokens(self, prompts: Sequence[str], max_sequence_length: int = 512) -> dict[str, Tokens]:
    """component -> the encoder inputs (host numpy), as the pipeline builds them."""
    prompts = check_prompts(prompts)
    return {s.component: tokenize(s, self.tokenizers[s.component], prompts, max_sequence_length)
            for s in self.recipe.streams}

  def __call__(self, prompts: Sequence[str], max_sequence_length: int = 512) -> PromptEmbeddings:
    tokens = self.tokens(prompts, max_sequence_length)
    inputs = {c: (t.input_ids, t.attention_mask) for c, t in tokens.items()}
    out = self.program(inputs, state=self.state)
    txt = np.asarray(out["txt"], np.float32)
    # Only the sequence stream counts as cut: CLIP always reads its first 77 tokens.
    cut = np.any([tokens[s.component].truncated for s in self.recipe.streams if not s.fixed_length], axis=0)
    return PromptEmbeddings(txt, None if "y" not in out else np.asarray(out["y"], np.float32),
                            text_ids(self.recipe, *txt.shape[:2]), truncated=tuple(bool(c) for c in cut))


def check_vocab(tokenizer, config, where: str) -> None:
  """ValueError when the tokenizer has ids the encoder's embedding table lacks (a tokenizer of another model)."""
  if len(tokenizer) > config.vocab_size:
    raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size is "
                     f"{config.vocab_size} (a tokenizer of another model?)")


def check_layers(stream: Stream, config, recipe: str, where: str) -> None:
  """ValueError when the encoder lacks a hidden state the recipe stacks (a model cut too short, a tiny one)."""
  if stream.layers and max(stream.layers) > config.num_layers:
    raise ValueError(f"{where}: the {recipe} recipe reads hidden states {stream.layers} but this "
                     f"{config.architecture} runs {config.num_layers} layers")


def recipe_for(kinds: Sequence[str]) -> Recipe:
  """The recipe whose streams take exactly these encoder kinds (any order); ValueError otherwise."""
  for recipe in RECIPES.values():
    if sorted(kinds) == sorted(k for s in recipe.streams for k in s.kinds):
      return recipe
  raise ValueError(f"text encoders {sorted(kinds)} make no FLUX pipeline (expected one Qwen3 (FLUX.2 klein), one "
                   "Mistral (FLUX.2 dev), or T5 and CLIP (FLUX.1))")


def with_layers(recipe: Recipe, layers: tuple[int, ...]) -> Recipe:
  """`recipe` reading other hidden states (a small random encoder has fewer layers than the real one)."""
  streams = tuple(dataclasses.replace(s, layers=layers) if s.layers else s for s in recipe.streams)
  return dataclasses.replace(recipe, streams=streams)


def random_prompt_encoder(cfg, *, seed: int) -> PromptEncoder:
  """A small random-weights text encoder of the family of the transformer config `cfg` (`MMDiTConfig`), giving its
  context_dim (and pooled_dim), with a tiny tokenizer built offline: for `generate --random-text-encoder` and
  tests. Deterministic in `seed`."""
  from sparse_context_jax.encoders.random_text import LAYERS, random_parts
  name, encoders, tokenizers = random_parts(cfg, seed=seed)
  return PromptEncoder(with_layers(RECIPES[name], LAYERS), encoders, tokenizers, name=f"random-{name}-text")


# A converted pipeline keeps each encoder's tokenizer in the sibling folder the diffusers pipeline names.
PIPELINE_TEXT = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def is_tokenizer_folder(path: Path) -> bool:
  return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def load_tokenizer(folder: Path, sibling: Path | None = None):
  """The tokenizer of the converted encoder `folder`: in the folder itself (a transformers repo), its `tokenizer/`,
  or `sibling` (a pipeline's `tokenizer/` beside `text_encoder/`); ValueError naming the places looked in."""
  from transformers import AutoTokenizer
  places = [folder, folder / "tokenizer"] + ([sibling] if sibling is not None else [])
  for place in places:
    if place.is_dir() and is_tokenizer_folder(place):
      try:
        return AutoTokenizer.from_pretrained(str(place))
      except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer in {place}: {e}") from None
  raise ValueError(f"no tokenizer for the text encoder {folder} (looked for tokenizer_config.json / tokenizer.json "
                   f"in {', '.join(str(p) for p in places)})")


def _text_folders(path) -> list[tuple[Path, Path | None]]:
  """(encoder folder, tokenizer folder beside it or None) for one argument of `load_prompt_encoder`."""
  path = Path(path)
  if not path.exists():
    raise ValueError(f"text encoder {path} does not exist")
  if not path.is_dir():
    raise ValueError(f"text encoder {path} is not a folder (expected a `convert` output or a converted pipeline)")
  if (path / "text_encoder").is_dir():
    return [(path / enc, path / tok) for enc, tok in PIPELINE_TEXT if (path / enc).is_dir()]
  return [(path, None)]


def load_prompt_encoder(*paths, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None) -> PromptEncoder:
  """The prompt encoder of `convert` outputs: one Qwen3 (FLUX.2 klein) or Mistral (FLUX.2 dev) encoder, T5 and
  CLIP in either order (FLUX.1), or a converted pipeline folder (its `text_encoder/`, `text_encoder_2/` and
  tokenizers). `dtype`: parameter and compute dtype (outputs are float32); `mesh`: parameters loaded sharded onto
  it. ValueError (CheckpointError for a bad checkpoint) naming the folder on any mismatch."""
  from sparse_context_jax.convert import load_text_encoder, read_config
  from sparse_context_jax.convert.kinds import kind_of
  if not paths:
    raise ValueError("no text encoder folder given (expected a converted Qwen3 or Mistral encoder, T5 and CLIP, or "
                     "a converted pipeline)")
  parts = []
  for folder, sibling in [f for p in paths for f in _text_folders(p)]:
    cfg = read_config(folder)
    if not kind_of(cfg).text:
      raise ValueError(f"{folder} is a converted {kind_of(cfg).noun}, not a text encoder")
    tokenizer = load_tokenizer(folder, sibling)
    check_vocab(tokenizer, cfg, str(folder))
    parts.append((text_kind(cfg), cfg, folder, tokenizer))
  recipe = recipe_for([kind for kind, *_ in parts])
  streams = [next(s for s in recipe.streams if kind in s.kinds) for kind, *_ in parts]
  for stream, (_, cfg, folder, tokenizer) in zip(streams, parts):   # every check before any weight is read
    check_layers(stream, cfg, recipe.name, str(folder))
    if stream.chat is not None and not tokenizer.chat_template:
      raise ValueError(f"the tokenizer of {folder} has no chat template ({recipe.name} formats prompts with it)")
  encoders, tokenizers = {}, {}
  for stream, (_, _, folder, tokenizer) in zip(streams, parts):
    encoders[stream.component] = load_text_encoder(folder, dtype=dtype, mesh=mesh)
    tokenizers[stream.component] = tokenizer
  return PromptEncoder(recipe, encoders, tokenizers, name=f"{recipe.name}-text:" + "+".join(
      str(folder) for _, _, folder, _ in parts))
