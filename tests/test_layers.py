"""jbtx's layers import one way: each subpackage only from those before it in `LAYERS`
(an AST walk of every module, function-level imports included), and no two
subpackages import each other, directly or through others."""

import ast
import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jbtx"
# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ("config", "runtime", "models", "interop", "data", "inference", "training",
          "methods", "eval", "pipeline", "cli")
# Entry points (`python -m …`) and the package facade: the top layer, whatever folder
# they sit in.
CLI_MODULES = ("jbtx", "jbtx.train", "jbtx.convert", "jbtx.compile", "jbtx.eval.__main__",
               "jbtx.eval.harness")


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  parts = (root.name, *path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
  """The layer of a jbtx module: its subpackage, or "cli" for the entry points."""
  if module in CLI_MODULES:
    return "cli"
  parts = module.split(".")
  if len(parts) < 2 or parts[1] not in LAYERS:
    raise ValueError(f"{module} is in no layer: put it in a subpackage of LAYERS")
  return parts[1]


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, module) of every `jbtx` import in `tree`; `from jbtx.a import b` counts as
  `jbtx.a.b`, which `layer_of` places like `jbtx.a`."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
  return [(line, name) for line, name in found if name.split(".")[0] == "jbtx"]


def import_graph(root: pathlib.Path) -> list[tuple[str, int, str]]:
  """(importing module, line, imported module) for every jbtx import under `root`."""
  edges = []
  for path in sorted(root.rglob("*.py")):
    module = module_name(root, path)
    for line, imported in imported_modules(ast.parse(path.read_text(), str(path))):
      edges.append((module, line, imported))
  return edges


def imported_layer(imported: str) -> str:
  """The layer of an imported name (`jbtx.pipeline.stages.seed.SEED` -> pipeline); the
  facade's own names (`import jbtx`, `from jbtx import load`) are the top layer's."""
  parts = imported.split(".")
  for end in range(len(parts), 1, -1):
    if ".".join(parts[:end]) in CLI_MODULES:
      return "cli"
  return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "cli"


def violations(root: pathlib.Path) -> list[str]:
  """Every import against the order of `LAYERS`, as 'module:line imports name'."""
  found = []
  for module, line, imported in import_graph(root):
    target = imported_layer(imported)
    if LAYERS.index(target) > LAYERS.index(layer_of(module)):
      found.append(f"{module}:{line} imports {imported} ({layer_of(module)} -> {target})")
  return found


def layer_cycles(root: pathlib.Path) -> list[list[str]]:
  """Cycles in the graph of layers (an edge per import between two layers)."""
  graph: dict[str, set[str]] = {}
  for module, _, imported in import_graph(root):
    source, target = layer_of(module), imported_layer(imported)
    if source != target:
      graph.setdefault(source, set()).add(target)
  cycles, path = [], []

  def visit(node: str) -> None:
    if node in path:
      cycles.append([*path[path.index(node):], node])
      return
    path.append(node)
    for following in sorted(graph.get(node, ())):
      visit(following)
    path.pop()

  for node in sorted(graph):
    visit(node)
  return cycles


def test_jbtx_imports_follow_the_layers():
  assert violations(ROOT) == []
  assert layer_cycles(ROOT) == []


def test_every_module_is_in_a_layer():
  for path in ROOT.rglob("*.py"):
    layer_of(module_name(ROOT, path))  # raises for a module outside the layers


def _package(tmp_path: pathlib.Path, modules: dict[str, str]) -> pathlib.Path:
  root = tmp_path / "jbtx"
  for name, source in modules.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
  return root


def test_a_planted_upward_import_is_reported_with_its_line(tmp_path):
  root = _package(tmp_path, {
      "models/llama.py": "from jbtx.config import ModelConfig\n",
      "models/bad.py": """\
          import numpy as np

          def helper():
            from jbtx.pipeline import runner  # models must not know the pipeline
            return runner
          """,
  })
  assert violations(root) == ["jbtx.models.bad:4 imports jbtx.pipeline.runner "
                              "(models -> pipeline)"]


def test_a_planted_cycle_between_subpackages_is_reported(tmp_path):
  root = _package(tmp_path, {
      "data/loader.py": "from jbtx.training import loop\n",
      "training/loop.py": "from jbtx.data import loader\n",
  })
  assert violations(root) == ["jbtx.data.loader:1 imports jbtx.training.loop "
                              "(data -> training)"]
  assert layer_cycles(root) == [["data", "training", "data"], ["training", "data", "training"]]


def test_a_module_outside_the_layers_is_refused(tmp_path):
  root = _package(tmp_path, {"helpers.py": "import os\n"})
  with pytest.raises(ValueError, match=r"jbtx\.helpers is in no layer"):
    layer_of(module_name(root, root / "helpers.py"))
