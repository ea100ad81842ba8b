"""jaxtrain: a pure-functional JAX/Flax training pipeline.

The core is three pure functions on a :class:`TrainState` pytree:
:func:`create_train_state`, :func:`train_step` and :func:`eval_step`, written once
per device and run under ``jax.jit``, ``jax.pmap`` or ``jax.shard_map``.
"""

from jaxtrain import data, losses, models, parallel
from jaxtrain.keys import as_key, key_for
from jaxtrain.optim import make_optimizer
from jaxtrain.state import TrainState, create_train_state
from jaxtrain.loop import FitConfig, FitResult, fit
from jaxtrain.step import compute_gradients, eval_step, summarize, train_step
from jaxtrain.stopping import EarlyStopping

__version__ = "0.1.0"

__all__ = [
    "EarlyStopping",
    "FitConfig",
    "FitResult",
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
    "summarize",
    "train_step",
]
