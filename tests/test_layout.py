"""The package's structure: the docs' module map, one-way imports, nothing
private crossing modules, and a light ``import jaxtrain``."""

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

import jaxtrain

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxtrain"


def _modules() -> dict[str, pathlib.Path]:
  return {".".join(p.relative_to(REPO).with_suffix("").parts): p
          for p in sorted(PACKAGE.rglob("*.py"))}


def _top_level_imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
  """(module, names) of the imports at a module's top level (lazy imports
  inside functions are left out: they run on first use)."""
  out = []
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.append((node.module, [a.name for a in node.names]))
    elif isinstance(node, ast.Import):
      out.extend((a.name, []) for a in node.names)
  return out


def test_docs_module_map_matches_the_tree():
  layout = (REPO / "docs" / "reference" / "layout.md").read_text()
  mapped = set(re.findall(r"^\| `(jaxtrain/[\w/]+\.py)` \|", layout, flags=re.M))
  tree = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
  assert mapped == tree, (sorted(tree - mapped), sorted(mapped - tree))


def test_imports_form_no_cycle_and_never_reach_the_experiments():
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    targets = set()
    for module, names in _top_level_imports(path):
      assert not module.startswith("experiments"), f"{name} imports {module}"
      for candidate in [module] + [f"{module}.{n}" for n in names]:
        if candidate in modules and candidate != name:
          targets.add(candidate)
    graph[name] = targets - {"jaxtrain"}  # the package's __init__ re-exports only
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in graph[node]:
      if state.get(nxt) == "open":
        raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [node])


def test_no_private_name_is_imported_across_modules():
  offenders = []
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxtrain"):
        offenders += [f"{name}: from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_")]
  assert not offenders, offenders


def test_import_jaxtrain_is_light_and_leaves_logging_alone():
  script = """
import json, logging, sys
absl = logging.getLogger("absl")
before = (logging.getLogger().level, absl.level, len(absl.filters))
import jaxtrain
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"orbax", "tensorboardX", "matplotlib", "tensorflow_datasets"})
after = (logging.getLogger().level, absl.level, len(absl.filters))
print(json.dumps({"heavy": heavy, "same": before == after}))
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, cwd=REPO)
  assert json.loads(out.stdout.splitlines()[-1]) == {"heavy": [], "same": True}


@pytest.mark.parametrize("name,module", [
    ("checkpoint", "jaxtrain.rundir.checkpoint"), ("run", "jaxtrain.rundir.run"),
    ("many", "jaxtrain.train.many"), ("datasets", "jaxtrain.data"),
    ("monitor", "jaxtrain.rundir.monitor"), ("optim", "jaxtrain.core.optim"),
    ("data", "jaxtrain.data"), ("parallel", "jaxtrain.engine.parallel")])
def test_submodules_are_attributes_of_the_package(name, module):
  assert getattr(jaxtrain, name) is sys.modules[module]


def test_an_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    jaxtrain.nope  # noqa: B018
