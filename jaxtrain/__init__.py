"""jaxtrain: a pure-functional JAX/Flax training pipeline.

The core is three pure functions on a :class:`TrainState` pytree:
:func:`create_train_state`, :func:`train_step` and :func:`eval_step`, written once
per device and run under ``jax.jit``, ``jax.pmap`` or ``jax.shard_map``.

The package is laid out by concern (see the README's module map): ``core`` (keys,
state, steps, metrics, losses, optimizers), ``nn`` (models, convolutions),
``data`` (batching, sources), ``engine`` (compiled programs, feeds, devices),
``train`` (``fit`` and its pure bookkeeping) and ``rundir`` (run directories:
checkpoints, logs, plots). Submodules used from research code are attributes
of the package, imported on first use: ``jaxtrain.checkpoint``, ``jaxtrain.run``,
``jaxtrain.many``, ``jaxtrain.monitor``, ``jaxtrain.datasets`` (``jaxtrain.data``),
``jaxtrain.optim``, ``jaxtrain.plateau``, ``jaxtrain.conv``, ``jaxtrain.matmul`` and others.
"""

import importlib

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
from jaxtrain.train.config import FitConfig
from jaxtrain.train.fit import FitResult, fit
from jaxtrain.train.stopping import EarlyStopping

__version__ = "0.1.0"

# Public submodules by their short names, imported when first used: Orbax,
# tensorboardX and matplotlib load only with the modules that need them.
_SUBMODULES = {
    "cache": "jaxtrain.engine.cache",
    "checkpoint": "jaxtrain.rundir.checkpoint",
    "conv": "jaxtrain.nn.conv",
    "datasets": "jaxtrain.data",
    "keys": "jaxtrain.core.keys",
    "many": "jaxtrain.train.many",
    "matmul": "jaxtrain.nn.matmul",
    "metrics": "jaxtrain.core.metrics",
    "monitor": "jaxtrain.rundir.monitor",
    "optim": "jaxtrain.core.optim",
    "plateau": "jaxtrain.core.plateau",
    "plots": "jaxtrain.rundir.plots",
    "run": "jaxtrain.rundir.run",
    "state": "jaxtrain.core.state",
    "step": "jaxtrain.core.step",
    "stopping": "jaxtrain.train.stopping",
}


def __getattr__(name: str):
  if name in _SUBMODULES:
    module = importlib.import_module(_SUBMODULES[name])
    globals()[name] = module
    return module
  raise AttributeError(f"module 'jaxtrain' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))


__all__ = [
    "EarlyStopping",
    "FitConfig",
    "FitResult",
    "Prediction",
    "ReduceLROnPlateau",
    "Regularization",
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
    "train_step",
]
