"""What a compiled training call takes and gives: the :class:`Carry` it
updates, the :class:`Data` it reads, the :class:`Span` of steps it runs and its
:class:`Outputs`, with per-step metrics packed into one float32 row a step
(:func:`pack_metrics`, :class:`Packed`). The programs are in
:mod:`jaxtrain.engine.programs`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.state import TrainState

Arrays = Mapping[str, jax.Array]


class Carry(NamedTuple):
  """What a training call updates (its buffers are donated to the call).

  Attributes:
    state: the train state.
    halted: set once a non-finite step stopped the run (``nonfinite="stop"``).
    best: the best epoch's parameters (:mod:`jaxtrain.engine.best`), updated
      at every epoch end when ``spec.best`` names the rule; else None.
  """

  state: TrainState
  halted: jax.Array
  best: dict | None = None


class Data(NamedTuple):
  """What a training call reads.

  Attributes:
    train: the training arrays.
    step_evals: sets evaluated every ``spec.eval_every`` steps (may be empty).
    epoch_evals: sets evaluated at every epoch end (may be empty).
  """

  train: Arrays
  step_evals: Mapping[str, Arrays]
  epoch_evals: Mapping[str, Arrays]


class Span(NamedTuple):
  """Which steps a call runs: global steps ``first .. first + num``.

  Attributes:
    run_key: the run's base key (every key is derived from it by use and position).
    first: the first global step (int32, traced).
    num: how many steps (int32, traced).
  """

  run_key: jax.Array
  first: Any
  num: Any


class Outputs(NamedTuple):
  """What a training call returns besides the carry.

  Attributes:
    steps: per-step metrics in buffers of ``spec.span`` entries (entry ``j`` is
      step ``first + j``); a straight-line call's: one :class:`Packed`.
    epochs: ``{set: sums}`` with a leading slot axis: slot ``k`` is epoch
      ``first // steps_per_epoch + k`` where that epoch ended in the span (zeros
      elsewhere); None from a straight-line call (the caller evaluates).
  """

  steps: dict
  epochs: dict | None


def pack_metrics(metrics: Mapping[str, jax.Array], like: Mapping) -> jax.Array:
  """Scalar metrics as one float32 vector (in ``like``'s order): one buffer
  write per step, not one each."""
  return jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in like])


def unpack_metrics(packed: jax.Array, like: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
  """The dict :func:`pack_metrics` packed, each metric in ``like``'s dtype."""
  return {k: packed[..., j].astype(v.dtype) for j, (k, v) in enumerate(like.items())}


@jax.tree_util.register_pytree_node_class
class Packed:
  """A straight-line call's metrics as one ``[..., 1, k]`` float32 array and
  their ``(name, dtype)`` pairs: the host fetches one array a step, not one per
  metric (six fetches of ~13 µs each were most of a tiny step's cost). The
  pairs are the pytree's static part, so a program returns, with every trace
  of it, that trace's own names."""

  def __init__(self, values, names: tuple):
    self.values, self.names = values, names

  def tree_flatten(self):
    return (self.values,), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(children[0], names)

  def unpack(self) -> dict:
    """``{name: [..., 1]}`` in each metric's dtype, as the scanned program's."""
    values = np.asarray(self.values)
    return {k: values[..., j].astype(dtype) for j, (k, dtype) in enumerate(self.names)}


