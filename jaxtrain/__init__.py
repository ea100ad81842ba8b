"""jaxtrain: a pure-functional JAX/Flax training pipeline.

The core is three pure functions on a :class:`TrainState` pytree:
:func:`create_train_state`, :func:`train_step` and :func:`eval_step`, written once
per device and run under ``jax.jit``, ``jax.pmap`` or ``jax.shard_map``.

The package is laid out by concern (see docs/reference/layout.md): ``core`` (keys,
state, steps, metrics, losses, optimizers), ``nn`` (models, convolutions),
``data`` (batching, sources), ``engine`` (compiled programs, feeds, devices),
``train`` (``fit`` and its pure bookkeeping) and ``rundir`` (run directories:
checkpoints, logs, plots). Submodules used from research code have short
names, imported on first use: ``jaxtrain.checkpoint``, ``jaxtrain.run``,
``jaxtrain.many``, ``jaxtrain.monitor``, ``jaxtrain.datasets`` (``jaxtrain.data``),
``jaxtrain.losses``, ``jaxtrain.models``, ``jaxtrain.optim``, ``jaxtrain.parallel``,
``jaxtrain.plateau``, ``jaxtrain.conv``, ``jaxtrain.matmul`` and others. Each is
both an attribute and an importable module, and it is the very module it names,
so patching one patches the other:

>>> import sys
>>> import jaxtrain.optim
>>> from jaxtrain.losses import cross_entropy
>>> jaxtrain.optim is sys.modules["jaxtrain.core.optim"] is sys.modules["jaxtrain.optim"]
True
>>> cross_entropy is jaxtrain.core.losses.cross_entropy
True
"""

import importlib
import importlib.machinery
import sys


def _launching() -> bool:
  """Whether this process is ``python -m jaxtrain.launch``."""
  argv = getattr(sys, "orig_argv", [])
  return "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["jaxtrain.launch"]


if _launching():
  # Importing this package takes a second or more (JAX); a stop signal meanwhile
  # waits, blocked, for the launcher to forward it to the ranks it starts.
  import signal

  signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

from jaxtrain import data
from jaxtrain.core import losses
from jaxtrain.core.keys import as_key, key_for
from jaxtrain.core.metrics import summarize
from jaxtrain.core.optim import make_optimizer
from jaxtrain.core.plateau import ReduceLROnPlateau
from jaxtrain.core.predict import Prediction, predict
from jaxtrain.core.regularize import Regularization
from jaxtrain.core.state import TrainState, create_train_state
from jaxtrain.core.step import compute_gradients, eval_step, train_step
from jaxtrain.engine import parallel
from jaxtrain.nn import models
from jaxtrain.train.callbacks import Callback
from jaxtrain.train.config import FitConfig
from jaxtrain.train.fit import FitResult, fit
from jaxtrain.train.stopping import EarlyStopping
from jaxtrain.train.summary import Summary, summary

__version__ = "0.1.0"

# Public submodules by their short names, imported when first used: Orbax,
# tensorboardX and matplotlib load only with the modules that need them. Each
# short name is a module too (`import jaxtrain.checkpoint`, `from jaxtrain.losses
# import cross_entropy`): `_Aliases` below resolves it to the module it names.
_SUBMODULES = {
    "cache": "jaxtrain.engine.cache",
    "callbacks": "jaxtrain.train.callbacks",
    "checkpoint": "jaxtrain.rundir.checkpoint",
    "conv": "jaxtrain.nn.conv",
    "cpu_random": "jaxtrain.nn.cpu_random",
    "datasets": "jaxtrain.data",
    "keys": "jaxtrain.core.keys",
    "losses": "jaxtrain.core.losses",
    "many": "jaxtrain.train.many",
    "matmul": "jaxtrain.nn.matmul",
    "metrics": "jaxtrain.core.metrics",
    "models": "jaxtrain.nn.models",
    "monitor": "jaxtrain.rundir.monitor",
    "optim": "jaxtrain.core.optim",
    "parallel": "jaxtrain.engine.parallel",
    "plateau": "jaxtrain.core.plateau",
    "plots": "jaxtrain.rundir.plots",
    "run": "jaxtrain.rundir.run",
    "state": "jaxtrain.core.state",
    "step": "jaxtrain.core.step",
    "stopping": "jaxtrain.train.stopping",
    "trackers": "jaxtrain.rundir.trackers",
    "writers": "jaxtrain.rundir.writers",
}


class _Aliases:
  """Finds ``jaxtrain.<short name>`` and loads it as the module it names: the
  import system creates a placeholder module, ``exec_module`` puts the real one
  in its place in ``sys.modules``, and the import binds what is there then.
  The real module's ``__name__`` and ``__spec__`` stay its own."""

  def find_spec(self, fullname, path=None, target=None):
    package, _, short = fullname.rpartition(".")
    if package != __name__ or short not in _SUBMODULES:
      return None
    return importlib.machinery.ModuleSpec(fullname, self, origin=_SUBMODULES[short])

  def create_module(self, spec):
    return None  # the default placeholder

  def exec_module(self, module):
    short = module.__name__.rpartition(".")[2]
    sys.modules[module.__name__] = importlib.import_module(_SUBMODULES[short])


# Once per interpreter, whatever reloads the package; last, so that a real file
# (or a finder before ours) would win.
if not any(type(f).__qualname__ == _Aliases.__qualname__ and type(f).__module__ == __name__
           for f in sys.meta_path):
  sys.meta_path.append(_Aliases())


# Functions loaded with their module on first use (flax.nnx loads only with NNX).
_LAZY_FUNCTIONS = {"to_module": "jaxtrain.core.nnx_model", "with_module": "jaxtrain.core.nnx_model"}


def __getattr__(name: str):
  if name in _LAZY_FUNCTIONS:
    value = getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    globals()[name] = value
    return value
  if name in _SUBMODULES:  # one rule: the attribute is what `import jaxtrain.<name>` gives
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'jaxtrain' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES) | set(_LAZY_FUNCTIONS))


__all__ = [
    "Callback",
    "EarlyStopping",
    "FitConfig",
    "FitResult",
    "Prediction",
    "ReduceLROnPlateau",
    "Regularization",
    "Summary",
    "TrainState",
    "as_key",
    "compute_gradients",
    "create_train_state",
    "data",
    "eval_step",
    "fit",
    "key_for",
    "losses",
    "make_optimizer",
    "models",
    "parallel",
    "predict",
    "summarize",
    "summary",
    "to_module",
    "train_step",
    "with_module",
]
