"""Every layer's output on a batch, for activation histograms.

Flax Linen's ``capture_intermediates`` records what each submodule's
``__call__`` returns, and values a model ``sow``\\ s into ``"intermediates"``
land beside them; :func:`activations` names them by module path. ``fit`` logs
them as ``activations/<path>`` histograms in TensorBoard with the weights and
gradients (``FitConfig.histogram_every``), from one extra jitted call on the
first training batch at those epoch ends only: the training programs are
unchanged.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from jaxtrain.core.state import TrainState
from jaxtrain.core.step import Batch, compute_gradients


def activations(state: TrainState, inputs: jax.Array) -> dict[str, jax.Array]:
  """The outputs of every submodule of ``state``'s model on ``inputs``, in
  evaluation mode (no dropout, batch norm on its running averages), by module
  path; the model's own output is ``"output"``. Empty when ``state.apply_fn``
  is not a Linen module's ``apply``.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0), jnp.zeros((1, 3)),
  ...     loss_fn=jaxtrain.losses.cross_entropy)
  >>> {name: a.shape for name, a in activations(state, jnp.ones((4, 3))).items()}
  {'Dense_0': (4, 8), 'Dense_1': (4, 2), 'output': (4, 2)}
  """
  if not isinstance(getattr(state.apply_fn, "__self__", None), nn.Module):
    return {}
  _, mutated = state.apply_fn(state.variables, inputs, capture_intermediates=True,
                              mutable=["intermediates"], **state.call_kwargs(train=False))
  found = {}
  for path, value in jax.tree_util.tree_flatten_with_path(mutated["intermediates"])[0]:
    parts = []
    for key in path:
      name = getattr(key, "key", getattr(key, "idx", None))
      if name == "__call__" or (isinstance(name, int) and name == 0):
        continue
      parts.append(str(name))
    found["/".join(parts) or "output"] = value
  return dict(sorted(found.items()))


def gradients_and_activations(state: TrainState, batch: Batch, key) -> tuple:
  """The gradient on ``batch`` (as a training step computes it, dropout keyed
  by ``key``) and :func:`activations` on its inputs, in one program (on one
  device, so models with cross-replica batch norm run too)."""
  from jaxtrain.engine.parallel import AXIS, P, on_one_device

  return on_one_device(_snapshot, (P(), P(AXIS), P()), (P(), P(AXIS)))(state, batch, key)


def _snapshot(state: TrainState, batch: Batch, key, *, axis_name: str):
  grads, _, _ = compute_gradients(state, batch, key, axis_name=axis_name)
  return grads, activations(state, batch["inputs"])
