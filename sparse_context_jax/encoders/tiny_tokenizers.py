"""Tiny tokenizers of the four FLUX text-encoder families, built offline (no download) for random text encoders.

Each vocabulary is learnt from a small fixed corpus (deterministically: the same one every time), wrapped in the
transformers class the real model uses (`Qwen2Tokenizer`, `T5Tokenizer`, `CLIPTokenizer`; the generic
`TokenizersBackend` for Mistral, as transformers itself loads Mistral's `tokenizer.json`), given the real special
tokens and a chat template that renders the FLUX prompts as the real one does, and saved with `save_pretrained`:
`AutoTokenizer` loads the folder.
"""

from __future__ import annotations

import collections
import math
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

KINDS = ("qwen3", "mistral", "t5", "clip")

_WORDS = ("a an the of on in with and at by under over photo picture painting portrait cat dog fox bird horse "
          "woman man child tree house city street river mountain sky sun moon red green blue yellow black white "
          "small large old young quick brown lazy bright dark sofa table window garden beach forest snow rain "
          "sitting standing running jumps looking wearing holding style light shadow detailed colorful").split()


def corpus() -> list[str]:
  """A few hundred short English lines over a fixed word list: enough merges for prompts to tokenize sensibly."""
  n = len(_WORDS)
  return [" ".join(_WORDS[(i * k + j * 7) % n] for j in range(3 + i % 6)) for i in range(97) for k in (1, 5, 11)]


def _byte_bpe(vocab_size: int, suffix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) of a byte-level BPE learnt from `corpus()`: every byte is in the vocabulary (nothing is
  unknown), then the most frequent pair is merged until `vocab_size` (ties go to the smaller pair, so the result
  never varies; the `tokenizers` trainer breaks ties by hash order). `suffix` marks the end of a word (CLIP's
  "</w>"); words are lower-cased for it, as CLIP's normaliser does."""
  split = pre_tokenizers.ByteLevel(add_prefix_space=False)
  counts = collections.Counter(  # CLIP splits words at spaces (dropped), the others keep a space as "Ġ"
      piece for line in corpus() for piece in (line.lower().split() if suffix else
                                               [p for p, _ in split.pre_tokenize_str(line)]))
  words = {tuple(w[:-1]) + (w[-1] + suffix,): n for w, n in counts.items()}
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {p: i for i, p in enumerate(alphabet + ([c + suffix for c in alphabet] if suffix else []))}
  merges = []
  while len(vocab) < vocab_size:
    pairs = collections.Counter()
    for w, n in words.items():
      for pair in zip(w, w[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda pair: (-pairs[pair], pair))
    merges.append(best)
    vocab.setdefault(best[0] + best[1], len(vocab))
    words = {_merge(w, best): n for w, n in words.items()}
  return vocab, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(word):
    if word[i:i + 2] == pair:
      out.append(pair[0] + pair[1])
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


# Qwen3's template, reduced to what a FLUX prompt uses (user turns; the generation prompt; thinking switched off).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- if enable_thinking is "
    "defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")

# Mistral Small 3.x's template, reduced likewise (a system turn and user turns whose content is a list of parts).
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['content'] is string %}{%- set text = "
    "message['content'] %}{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | "
    "map(attribute='text') | join('') %}{%- endif %}{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text"
    " + '[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- else %}{{- "
    "text + eos_token }}{%- endif %}{%- endfor %}")


def _qwen3(vocab_size: int):
  from transformers import Qwen2Tokenizer
  vocab, merges = _byte_bpe(vocab_size)
  tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
  tok.add_tokens(["<think>", "</think>"])   # added, not special: as in Qwen3's vocabulary
  tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
  tok.chat_template = QWEN3_TEMPLATE
  return tok


def _mistral(vocab_size: int):
  from transformers import PreTrainedTokenizerFast
  specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
              "[IMG_BREAK]", "[IMG_END]", "<pad>"]   # Mistral's control tokens come first; <pad> is id 10 here
  vocab, merges = _byte_bpe(vocab_size)
  vocab = {**{s: i for i, s in enumerate(specials)}, **{p: len(specials) + i for i, p in enumerate(vocab)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
  tok.add_special_tokens(specials)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")
  fast.chat_template = MISTRAL_TEMPLATE
  return fast


def _t5(vocab_size: int):
  from transformers import T5Tokenizer
  # A unigram vocabulary without training: the printable characters and the corpus' words (with and without the
  # word-start marker), scored by log frequency.
  counts = collections.Counter(w for line in corpus() for w in line.split())
  chars = [(c, -20.0) for c in ["\u2581", *string.printable.strip()]]
  words = [(p, math.log(n) - 10.0) for w, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))
           for p in ("\u2581" + w, w)]
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *chars, *words][:max(vocab_size, 3 + len(chars))]
  return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip(vocab_size: int):
  from transformers import CLIPTokenizer
  vocab, merges = _byte_bpe(vocab_size + 256, suffix="</w>")   # its alphabet is twice as large
  for s in ("<|startoftext|>", "<|endoftext|>"):   # last, as in CLIP: the legacy pooling takes argmax(input_ids)
    vocab[s] = len(vocab)
  tok = CLIPTokenizer(vocab=vocab, merges=merges)
  tok.model_max_length = 77
  return tok


def build_tokenizer(kind: str, vocab_size: int = 320):
  """A tiny tokenizer of `kind` (one of KINDS), in memory; `vocab_size` is the size trained (specials and the byte
  alphabet may add a few)."""
  builders = {"qwen3": _qwen3, "mistral": _mistral, "t5": _t5, "clip": _clip}
  if kind not in builders:
    raise ValueError(f"tiny tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")
  return builders[kind](vocab_size)


def save_tiny_tokenizer(kind: str, path, vocab_size: int = 320) -> Path:
  """Builds the tiny tokenizer of `kind` and saves it to the folder `path` (created): `AutoTokenizer` loads it."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  build_tokenizer(kind, vocab_size).save_pretrained(path)
  return path
