"""The synthetic world: procedural reference sets whose target is a known function of the references and caption.

Both tasks of the paper, with exact ground truth (so toy experiments can report PSNR to the true target):
- `editing` (spatially aligned): one reference with 2-4 shapes of distinct kinds, each in its own quadrant, on a
  flat ground. Caption "make the blue circle red": the target is the reference with that shape's pixels
  recoloured. The caption names the shape's colour as well as its kind: at the stand-in pixel tokens' resolution
  (8x8 for 64x64 images) a shape is 2-3 pixels wide and its kind barely shows. The mask is the edited shape.
- `composition` (subject-driven): 1..max_refs references, reference i holding one subject shape (kinds distinct
  across references) and possibly a distractor of another kind. Caption "the star from image 1 at the top left,
  the square from image 2 at the bottom right": the target is a plain ground with each subject, in its colour
  and size, centred in the named quadrant. Mask i is reference i's subject.
Captions have at most `caption_words(max_refs)` words (the text length a model needs to read them whole).
Shapes are drawn without antialiasing and never overlap, so masks and targets are exact. Everything is a function
of (seed, index): `example(seed, i)` is the same on every machine, and `WorldRecords` writes it through the same
builder as a manifest.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from sparse_context_jax.images import encode_png
from sparse_context_jax.data.manifest import MAX_REFS, TASKS

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
# Quadrant centres as (row, column) fractions of the image.
PLACES = {"top left": (0.25, 0.25), "top right": (0.25, 0.75), "bottom left": (0.75, 0.25),
          "bottom right": (0.75, 0.75)}
TARGET_GROUND = (235, 235, 235)
EDIT_CAPTION = "make the {colour} {kind} {new}"
PART_CAPTION = "the {kind} from image {index} at the {place}"   # one per reference, joined by ", "


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
  """target (H, W, 3) uint8; references: list of (H, W, 3) uint8; masks: list of (H, W) uint8 (0 or 255)."""
  target: np.ndarray
  references: list[np.ndarray]
  masks: list[np.ndarray]
  caption: str
  task: str


def shape_mask(kind: str, centre: tuple[float, float], radius: float, size: tuple[int, int]) -> np.ndarray:
  """(H, W) bool: a shape of the given kind inscribed in the circle of `radius` around `centre` = (row, col)."""
  img = Image.new("1", (size[1], size[0]), 0)
  draw = ImageDraw.Draw(img)
  cy, cx = centre
  if kind == "circle":
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
  elif kind == "square":
    half = radius / math.sqrt(2)
    draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=1)
  elif kind in ("triangle", "star"):
    points, radii = (3, (radius,)) if kind == "triangle" else (5, (radius, 0.45 * radius))
    steps = points * len(radii)
    draw.polygon([(cx + radii[k % len(radii)] * math.sin(2 * math.pi * k / steps),
                   cy - radii[k % len(radii)] * math.cos(2 * math.pi * k / steps)) for k in range(steps)], fill=1)
  else:
    raise ValueError(f"unknown shape {kind!r} (expected one of {SHAPES})")
  return np.asarray(img, bool)


def _ground(rng: np.random.Generator) -> np.ndarray:
  """A light, low-saturation ground colour, far from every shape colour."""
  return (rng.uniform(170, 215) + rng.uniform(-15, 15, 3)).astype(np.uint8)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
  out = canvas.copy()
  out[mask] = colour
  return out


def _editing(rng: np.random.Generator, size: tuple[int, int]) -> SyntheticExample:
  H, W = size
  kinds = rng.permutation(SHAPES)[:int(rng.integers(2, 5))]
  colours = rng.choice(list(COLOURS), len(kinds))
  cells = rng.permutation(list(PLACES.values()))[:len(kinds)]
  ref = np.broadcast_to(_ground(rng), (H, W, 3)).copy()
  masks = {}
  for kind, colour, (fy, fx) in zip(kinds, colours, cells):
    radius = rng.uniform(0.12, 0.2) * min(H, W)
    jitter = rng.uniform(-0.04, 0.04, 2) * (H, W)
    masks[kind] = shape_mask(kind, (fy * H + jitter[0], fx * W + jitter[1]), radius, size)
    ref = _paint(ref, masks[kind], COLOURS[colour])
  edited = int(rng.integers(len(kinds)))
  kind = str(kinds[edited])
  new = str(rng.choice([c for c in COLOURS if c != colours[edited]]))
  return SyntheticExample(_paint(ref, masks[kind], COLOURS[new]), [ref], [masks[kind].astype(np.uint8) * 255],
                          EDIT_CAPTION.format(colour=colours[edited], kind=kind, new=new), "editing")


def _composition(rng: np.random.Generator, size: tuple[int, int], min_refs: int, max_refs: int) -> SyntheticExample:
  H, W = size
  n = int(rng.integers(min_refs, max_refs + 1))
  kinds = [str(k) for k in rng.permutation(SHAPES)[:n]]
  places = [str(p) for p in rng.permutation(list(PLACES))[:n]]
  target = np.broadcast_to(np.asarray(TARGET_GROUND, np.uint8), (H, W, 3)).copy()
  refs, masks, parts = [], [], []
  for i, (kind, place) in enumerate(zip(kinds, places)):
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    radius = rng.uniform(0.12, 0.2) * min(H, W)
    cells = rng.permutation(list(PLACES.values()))
    subject = shape_mask(kind, (cells[0][0] * H, cells[0][1] * W), radius, size)
    ref = _paint(np.broadcast_to(_ground(rng), (H, W, 3)), subject, colour)
    if rng.random() < 0.5:
      other = str(rng.choice([k for k in SHAPES if k != kind]))
      distractor = shape_mask(other, (cells[1][0] * H, cells[1][1] * W), rng.uniform(0.1, 0.18) * min(H, W), size)
      ref = _paint(ref, distractor, COLOURS[str(rng.choice(list(COLOURS)))])
    fy, fx = PLACES[place]
    target = _paint(target, shape_mask(kind, (fy * H, fx * W), radius, size), colour)
    refs.append(ref)
    masks.append(subject.astype(np.uint8) * 255)
    parts.append(PART_CAPTION.format(kind=kind, index=i + 1, place=place))
  return SyntheticExample(target, refs, masks, ", ".join(parts), "composition")


def caption_words(max_refs: int, tasks: tuple[str, ...] = TASKS) -> int:
  """Words in the longest caption of a world with up to `max_refs` references and these tasks (the stand-in text
  encoder reads one word per position)."""
  assert all(" " not in w for w in (*SHAPES, *COLOURS)), "shape and colour names are single words"
  edit = len(EDIT_CAPTION.format(colour="c", kind="k", new="n").split())
  place = max(PLACES, key=lambda p: len(p.split()))
  part = len(PART_CAPTION.format(kind="k", index=MAX_REFS, place=place).split())
  return max(edit if "editing" in tasks else 0, part * max_refs if "composition" in tasks else 0)


def example(seed: int, index: int, size: tuple[int, int] = (64, 64), max_refs: int = MAX_REFS,
            tasks: tuple[str, ...] = TASKS, min_refs: int = 1) -> SyntheticExample:
  """Example `index` of the world `seed`: a pure function of its arguments. Tasks alternate by index parity;
  composition examples have min_refs..max_refs references (editing ones always 1)."""
  if min(size) < 16:
    raise ValueError(f"size {size} (expected sides of at least 16 pixels)")
  if not 1 <= min_refs <= max_refs <= MAX_REFS:
    raise ValueError(f"min_refs {min_refs}, max_refs {max_refs} "
                     f"(expected 1 <= min_refs <= max_refs <= {MAX_REFS})")
  unknown = set(tasks) - set(TASKS)
  if not tasks or unknown:
    raise ValueError(f"tasks {tasks} (expected a non-empty subset of {TASKS})")
  rng = np.random.default_rng([seed, index])
  task = tasks[index % len(tasks)]
  return _editing(rng, size) if task == "editing" else _composition(rng, size, min_refs, max_refs)


class WorldRecords:
  """`count` examples of the world `seed` as `builder.Records` (generated on demand, never held in memory)."""

  def __init__(self, count: int, seed: int = 0, size: tuple[int, int] = (64, 64), max_refs: int = MAX_REFS,
               tasks: tuple[str, ...] = TASKS, min_refs: int = 1):
    example(seed, 0, size, max_refs, tasks, min_refs)   # validates the arguments before a build starts
    self.count, self.seed, self.size, self.tasks = count, seed, tuple(size), tuple(tasks)
    self.min_refs, self.max_refs = min_refs, max_refs
    self.sizes = [self.size] * count

  def __len__(self) -> int:
    return self.count

  def encoded(self, i: int) -> dict:
    ex = example(self.seed, i, self.size, self.max_refs, self.tasks, self.min_refs)
    return dict(target=encode_png(ex.target), references=[encode_png(r) for r in ex.references],
                masks=[encode_png(m) for m in ex.masks], caption=ex.caption, task=ex.task,
                origin=f"world seed {self.seed} #{i}")

  def metadata(self) -> dict:
    return {"generator": "synthetic world", "seed": self.seed, "size": list(self.size), "tasks": list(self.tasks),
            "refs": [self.min_refs, self.max_refs]}


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
  """Peak signal-to-noise ratio in dB between two images of one shape (inf when equal)."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)
