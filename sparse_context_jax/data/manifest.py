"""The manifest: one JSON object per line describing one training example, and its validation.

```
{"target": "edits/0001_out.png", "references": ["edits/0001_in.png"], "caption": "make the sky orange",
 "task": "editing", "masks": ["edits/0001_region.png"]}
{"target": "subj/17.jpg", "references": ["subj/17_a.jpg", "subj/17_b.jpg"], "caption": "the dog from image 1
 on the sofa from image 2", "task": "composition"}
```
- `target` (str): the image to generate. `references` (list of 1..max_refs str): the conditioning images, in order
  ("image 1" is the first).
- `caption` (str): the instruction or description. `task`: one of `TASKS` (`editing`: spatially aligned editing,
  the target is an edit of reference 1; `composition`: subject-driven generation from 1..max_refs subjects).
- `masks` (optional list of str, one per reference, same size as its reference): subject or edit-region masks,
  nonzero inside; they feed the `mask` selection strategy. All references have a mask or none does.
- Relative paths are relative to the manifest's folder. Blank lines are ignored; any other key is an error.

Validation decodes every image (so corrupt or truncated files are caught at build time, not mid-training) and
reports every bad row with its 1-based line number and reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sparse_context_jax.images import ImageError, canonical_image, canonical_mask

TASKS = ("editing", "composition")
MAX_REFS = 4
_KEYS = {"target", "references", "caption", "task", "masks"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One valid manifest row, paths resolved; `size` is the target's (height, width) after conversion."""
  line: int
  target: Path
  references: tuple[Path, ...]
  caption: str
  task: str
  masks: tuple[Path, ...]
  size: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BadRow:
  line: int
  reason: str

  def __str__(self) -> str:
    return f"line {self.line}: {self.reason}"


def _paths(value, what: str, base: Path) -> tuple[Path, ...]:
  if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
    raise ValueError(f"{what} must be a list of non-empty path strings, got {json.dumps(value)[:80]}")
  return tuple(base / p for p in value)


def _check_image(path: Path, what: str, loader) -> tuple[int, int]:
  try:
    return loader(path)[1]
  except ImageError as e:
    raise ValueError(f"{what} {os.fspath(path)!r}: {e}") from None


def check_row(obj, line: int, base: Path, max_refs: int = MAX_REFS) -> Row:
  """A parsed JSON value -> `Row`; raises ValueError naming the first problem (cheap checks before decoding)."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  missing, unknown = {"target", "references", "caption", "task"} - obj.keys(), obj.keys() - _KEYS
  if missing or unknown:
    raise ValueError("; ".join([f"missing key(s) {sorted(missing)}"] * bool(missing) +
                               [f"unknown key(s) {sorted(unknown)} (expected {sorted(_KEYS)})"] * bool(unknown)))
  if obj["task"] not in TASKS:
    raise ValueError(f"unknown task {obj['task']!r} (expected one of {list(TASKS)})")
  if not isinstance(obj["caption"], str):
    raise ValueError(f"caption must be a string, got {json.dumps(obj['caption'])[:80]}")
  if not isinstance(obj["target"], str) or not obj["target"]:
    raise ValueError(f"target must be a non-empty path string, got {json.dumps(obj['target'])[:80]}")
  refs = _paths(obj["references"], "references", base)
  if not refs:
    raise ValueError("no reference (expected 1 to %d)" % max_refs)
  if len(refs) > max_refs:
    raise ValueError(f"{len(refs)} references, more than the maximum {max_refs}")
  masks = _paths(obj["masks"], "masks", base) if obj.get("masks") is not None else ()
  if masks and len(masks) != len(refs):
    raise ValueError(f"{len(masks)} masks for {len(refs)} references (expected one mask per reference, or none)")
  size = _check_image(base / obj["target"], "target", canonical_image)
  ref_sizes = [_check_image(p, f"reference {i + 1}", canonical_image) for i, p in enumerate(refs)]
  for i, (mask, ref_size) in enumerate(zip(masks, ref_sizes)):
    mask_size = _check_image(mask, f"mask {i + 1}", canonical_mask)
    if mask_size != ref_size:
      raise ValueError(f"mask {i + 1} {os.fspath(mask)!r} is {mask_size[0]}x{mask_size[1]} (HxW), its reference "
                       f"is {ref_size[0]}x{ref_size[1]}")
  return Row(line, base / obj["target"], refs, obj["caption"], obj["task"], masks, size)


def read_manifest(path: str | os.PathLike, max_refs: int = MAX_REFS) -> tuple[list[Row], list[BadRow]]:
  """Every non-blank line of a JSONL manifest -> (valid rows, bad rows), both in line order."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise FileNotFoundError(f"cannot read manifest {os.fspath(path)!r}: {e}") from None
  rows, bad = [], []
  for line, raw in enumerate(text.splitlines(), start=1):
    if not raw.strip():
      continue
    try:
      rows.append(check_row(json.loads(raw), line, path.parent, max_refs))
    except json.JSONDecodeError as e:
      bad.append(BadRow(line, f"not valid JSON ({e.msg} at column {e.colno})"))
    except ValueError as e:
      bad.append(BadRow(line, str(e)))
  return rows, bad


class ManifestRecords:
  """Valid rows as `builder.Records`: files are read and converted again when written (validation kept only the
  sizes, so memory does not grow with the dataset); a file changed since validation fails the build."""

  def __init__(self, rows: list[Row], manifest: str | os.PathLike):
    self.rows, self.sizes, self._name = rows, [r.size for r in rows], Path(manifest).name

  def __len__(self) -> int:
    return len(self.rows)

  def encoded(self, i: int) -> dict:
    r = self.rows[i]
    return dict(target=canonical_image(r.target)[0], references=[canonical_image(p)[0] for p in r.references],
                masks=[canonical_mask(p)[0] for p in r.masks], caption=r.caption, task=r.task,
                origin=f"{self._name}:{r.line}")
