"""The package reads as layers: each part imports only the parts below it (no circle, no arrow upwards), and one
place splits a module into graph and state for jit."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sparse_context_jax"
# Lowest first. A module may import from its own part and from parts before it.
LAYERS = ["errors", "progress", "compile_cache", "programs", "parallel", "model", "lora", "text", "images", "figures",
          "sparse", "convert", "encoders", "sampling", "data", "generate", "train", "plan", "cli", "commands",
          "__init__", "__main__"]


def _part(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_context_jax"):
      found.append(node.module)
    elif isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.startswith("sparse_context_jax")]
  return found


def test_every_import_points_down():
  upward = []
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    me = _part(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
    assert me in LAYERS, f"{path}: part {me!r} is not in LAYERS"
    for module in _imports(path):
      if LAYERS.index(_part(module)) > LAYERS.index(me):
        upward.append(f"{path.relative_to(ROOT.parent)} imports {module}")
  assert not upward, upward


def test_one_place_splits_modules_for_jit():
  """`nnx.split` of a model for a jitted call lives in programs.ModuleProgram (and the train state's setup, which
  splits the abstract model once); nowhere else."""
  splitters = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "nnx.split(" in p.read_text())
  # mmdit.py and text/stack.py split a layer stack for lax.scan, model/attention_mass.py to run its first layers;
  # convert/checkpoint.py an abstract module to restore its state.
  allowed = {"programs.py", "train/state.py", "model/mmdit.py", "model/attention_mass.py", "convert/checkpoint.py",
             "text/stack.py"}
  assert set(splitters) <= allowed, sorted(set(splitters) - allowed)
