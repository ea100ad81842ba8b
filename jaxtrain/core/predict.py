"""Predictions: deterministic, or Monte Carlo dropout (Gal & Ghahramani, 2016).

:func:`predict` runs the model in evaluation mode: batch norm on its running
averages, no statistics updated. With ``mc_samples=S`` every ``nn.Dropout`` of
the model (any Flax linen model, left unchanged) draws its mask anyway, one mask
per sample from ``key``, and the ``S`` forward passes run vmapped in one program;
their mean and variance picture the distribution of the model's outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.keys import as_key
from jaxtrain.core.state import TrainState


class Prediction(NamedTuple):
  """Monte Carlo dropout predictions over ``S`` masks.

  Each field has the structure of the model's (transformed) outputs: one
  array, or the same pytree (a tuple, a dict) with one array per leaf.

  Attributes:
    mean: the mean over samples of the (transformed) outputs, ``[n, ...]``.
    variance: their variance over samples (population, ``ddof=0``), ``[n, ...]``.
    samples: every sample's outputs, ``[S, n, ...]`` (None unless asked for).
  """

  mean: jax.Array
  variance: jax.Array
  samples: jax.Array | None = None


def _outputs(state: TrainState, inputs, key):
  model, variables = state.model, state.variables
  if key is None:
    rngs = model.rngs(None, variables, inputs, train=False)
    return model.apply(variables, inputs, train=False, rngs=rngs)[0]
  # Every stream draws from the sample's key, as in a training step.
  rngs = {**model.rngs(key, variables, inputs, train=True), "dropout": key}
  return model.apply(variables, inputs, train=False, rngs=rngs, dropout=True)[0]


@functools.partial(jax.jit, static_argnames=("samples", "transform", "keep"))
def _mc(state, inputs, key, *, samples: int, transform, keep: bool):
  keys = jax.random.split(key, samples)
  outs = jax.vmap(lambda k: transform(_outputs(state, inputs, k)))(keys)
  outs = jax.tree.map(lambda o: o.astype(jnp.float32), outs)
  return Prediction(jax.tree.map(lambda o: o.mean(0), outs), jax.tree.map(lambda o: o.var(0), outs),
                    outs if keep else None)


@functools.partial(jax.jit, static_argnames=("transform",))
def _plain(state, inputs, *, transform):
  return transform(_outputs(state, inputs, None))


def _identity(x):
  return x


def predict(state: TrainState, inputs, *, key=None, mc_samples: int = 0,
            transform: Callable[[jax.Array], jax.Array] | None = None,
            batch_size: int = 4096, return_samples: bool = False):
  """The model's outputs on ``inputs`` in evaluation mode, or their Monte Carlo
  dropout mean and variance.

  Args:
    state: a :class:`~jaxtrain.TrainState` (its parameters and batch statistics;
      the batch statistics are used as running averages and never updated).
    inputs: ``[n, ...]`` inputs (numpy or jax).
    key: the dropout key for ``mc_samples > 0``: sample ``s`` uses
      ``jax.random.split(key, mc_samples)[s]`` for every row batch.
    mc_samples: 0 for one deterministic pass (dropout off); else the number of
      dropout masks drawn, each a full pass over ``inputs``.
    transform: applied to each pass's outputs before averaging (e.g.
      ``jax.nn.softmax`` for class probabilities); default: the raw outputs.
    batch_size: rows per compiled call (the ``S`` passes of a row batch run
      vmapped together); bounds the memory. The masks are drawn per call, so
      MC samples depend on it (the same ``batch_size``, the same numbers).
    return_samples: also return every sample (``Prediction.samples``).

  Returns:
    The outputs ``[n, ...]`` when ``mc_samples == 0`` (the same pytree as the
    model returns: a tuple or dict of arrays stays one), else a
    :class:`Prediction` whose fields have that structure.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(16,), outputs=2, dropout_rate=0.5),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0), jnp.zeros((1, 2)),
  ...     loss_fn=jaxtrain.losses.cross_entropy)
  >>> x = jnp.ones((3, 2))
  >>> predict(state, x).shape
  (3, 2)
  >>> p = predict(state, x, key=jax.random.key(1), mc_samples=50, transform=jax.nn.softmax)
  >>> p.mean.shape, bool((p.variance > 0).all())
  ((3, 2), True)
  """
  if isinstance(mc_samples, bool) or not isinstance(mc_samples, int | np.integer) \
      or mc_samples < 0:
    raise ValueError(f"mc_samples must be an integer >= 0, got {mc_samples!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  if mc_samples and key is None:
    raise ValueError(f"mc_samples={mc_samples} needs a key for the dropout masks")
  if np.ndim(inputs) < 1 or not len(inputs):
    raise ValueError(f"inputs must have a leading row axis of length >= 1, got shape "
                     f"{np.shape(inputs)}")
  transform = transform or _identity
  parts = [inputs[a:a + batch_size] for a in range(0, len(inputs), batch_size)]
  if not mc_samples:
    return _concatenate([_plain(state, x, transform=transform) for x in parts])
  key = as_key(key)
  out = [_mc(state, x, key, samples=int(mc_samples), transform=transform,
             keep=return_samples) for x in parts]
  return Prediction(_concatenate([p.mean for p in out]),
                    _concatenate([p.variance for p in out]),
                    _concatenate([p.samples for p in out], axis=1) if return_samples
                    else None)


def _concatenate(parts, axis: int = 0):
  """Row batches' outputs joined leaf by leaf (any output pytree)."""
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=axis), *parts)
