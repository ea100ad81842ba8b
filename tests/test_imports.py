"""The package's short names are real modules: ``import jaxtrain.checkpoint`` and
``from jaxtrain.losses import cross_entropy`` work in a fresh interpreter and give
the very module that the attribute ``jaxtrain.<name>`` is (so monkeypatching one
patches the other), while ``import jaxtrain`` alone stays light."""

import json
import pathlib
import subprocess
import sys

import jaxtrain

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ["orbax", "tensorboardX", "matplotlib"]

# The ways users write them: (line, short name, the module it stands for).
IMPORT_LINES = [
    ("import jaxtrain.checkpoint", "checkpoint", "jaxtrain.rundir.checkpoint"),
    ("from jaxtrain.checkpoint import load", "checkpoint", "jaxtrain.rundir.checkpoint"),
    ("from jaxtrain.losses import cross_entropy", "losses", "jaxtrain.core.losses"),
    ("import jaxtrain.models", "models", "jaxtrain.nn.models"),
    ("import jaxtrain.parallel", "parallel", "jaxtrain.engine.parallel"),
    ("import jaxtrain.optim", "optim", "jaxtrain.core.optim"),
    ("import jaxtrain.many", "many", "jaxtrain.train.many"),
    ("from jaxtrain.run import run", "run", "jaxtrain.rundir.run"),
    ("import jaxtrain.monitor", "monitor", "jaxtrain.rundir.monitor"),
    ("import jaxtrain.conv", "conv", "jaxtrain.nn.conv"),
    ("import jaxtrain.matmul", "matmul", "jaxtrain.nn.matmul"),
    ("import jaxtrain.datasets", "datasets", "jaxtrain.data"),
    ("import jaxtrain.plateau", "plateau", "jaxtrain.core.plateau"),
]
# And every short name, both ways.
IMPORT_LINES += [(f"import jaxtrain.{name}", name, module)
                 for name, module in sorted(jaxtrain._SUBMODULES.items())]
IMPORT_LINES += [(f"from jaxtrain import {name}", name, module)
                 for name, module in sorted(jaxtrain._SUBMODULES.items())]

# Runs in a fresh interpreter: `import jaxtrain` alone, then each line with its
# alias forgotten (sys.modules entry and package attribute dropped), so that
# every line goes through the import system and must bind both again.
CHILD = """
import json, sys
LINES, HEAVY = json.loads(sys.argv[1])
import jaxtrain
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
bad = []
for line, name, module in LINES:
  sys.modules.pop("jaxtrain." + name, None)
  vars(jaxtrain).pop(name, None)
  scope = {}
  try:
    exec(line, scope)
  except Exception as e:
    bad.append([line, repr(e)])
    continue
  real = sys.modules[module]
  bound = scope["jaxtrain"].__dict__[name] if line.startswith("import ") else scope[line.split()[-1]]
  wanted = real if line.startswith("import ") or line.startswith("from jaxtrain import") else getattr(real, line.split()[-1])
  checks = {"attribute": getattr(jaxtrain, name) is real,
            "sys.modules": sys.modules["jaxtrain." + name] is real,
            "bound": bound is wanted,
            "own name": real.__name__ == real.__spec__.name == module}
  if not all(checks.values()):
    bad.append([line, checks])
print(json.dumps({"heavy": heavy, "bad": bad, "dir": sorted(set(jaxtrain._SUBMODULES) - set(dir(jaxtrain)))}))
"""


def _child(lines) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([lines, HEAVY])],
                       capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.splitlines()[-1])


def test_the_short_names_are_the_public_namespaces():
  assert {name: module for _, name, module in IMPORT_LINES} == jaxtrain._SUBMODULES
  assert set(jaxtrain._SUBMODULES) <= set(dir(jaxtrain))
  assert jaxtrain._SUBMODULES["datasets"] == "jaxtrain.data"


def test_import_jaxtrain_is_light_and_every_import_line_gives_the_attribute():
  result = _child(IMPORT_LINES)
  assert result == {"heavy": [], "bad": [], "dir": []}


def test_an_alias_imported_first_thing_in_a_fresh_interpreter():
  """`from jaxtrain.run import run` before anything else: the import of the
  package itself happens inside the alias's import; the function `run` is
  what is bound, the module stays `jaxtrain.run`."""
  script = """
import json, sys
from jaxtrain.run import run
import jaxtrain.checkpoint
print(json.dumps([callable(run), run is sys.modules["jaxtrain.rundir.run"].run,
                  jaxtrain.run is sys.modules["jaxtrain.rundir.run"] is sys.modules["jaxtrain.run"],
                  jaxtrain.checkpoint is sys.modules["jaxtrain.rundir.checkpoint"]]))
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.splitlines()[-1]) == [True, True, True, True]


def test_monkeypatching_the_alias_patches_the_module(monkeypatch):
  import jaxtrain.optim

  from jaxtrain.core import optim
  monkeypatch.setattr(jaxtrain.optim, "make_optimizer", "patched")
  assert optim.make_optimizer == "patched"


def test_an_unknown_submodule_is_still_not_found():
  script = """
try:
  import jaxtrain.nope
except ModuleNotFoundError as e:
  print(e.name)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, cwd=REPO)
  assert out.stdout.split() == ["jaxtrain.nope"]
