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

from jaxtrain.core.state import TrainState
from jaxtrain.core.step import Batch, compute_gradients


def activations(state: TrainState, inputs: jax.Array) -> dict[str, jax.Array]:
  """The outputs of every submodule of ``state``'s model on ``inputs``, in
  evaluation mode (no dropout, batch norm on its running averages), by module
  path; the model's own output is ``"output"`` (``"output/<i>"`` for each
  leaf of an output pytree). Empty when the model is no Linen module.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0), jnp.zeros((1, 3)),
  ...     loss_fn=jaxtrain.losses.cross_entropy)
  >>> {name: a.shape for name, a in activations(state, jnp.ones((4, 3))).items()}
  {'Dense_0': (4, 8), 'Dense_1': (4, 2), 'output': (4, 2)}
  """
  model = state.model
  if model.kind not in ("linen", "nnx"):
    return {}
  variables = state.variables
  _, mutated = model.apply(variables, inputs, train=False, capture_intermediates=True,
                           mutable=("intermediates",),
                           rngs=model.rngs(None, variables, inputs, train=False))
  if model.kind == "nnx":  # named by the module path already
    return dict(sorted(mutated["intermediates"].items()))
  found = {}
  for path, value in jax.tree_util.tree_flatten_with_path(mutated["intermediates"])[0]:
    found[_name(path)] = value
  return dict(sorted(found.items()))


def _name(path) -> str:
  """A captured value's name: its module path, ``output`` for the model's own
  outputs, then the outputs' own structure (``output/1`` for a tuple's second)."""
  names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
  parts, i = [], 0
  while i < len(names):
    if names[i] == "__call__":  # the method, then the call's index (a 1-tuple per call)
      if i == 0:
        parts.append("output")
      if i + 1 < len(names) and names[i + 1] not in (0, None):
        parts.append(str(names[i + 1]))  # a module called more than once
      i += 2
      continue
    parts.append(str(names[i]))
    i += 1
  if len(names) >= 2 and names[-1] == 0 and isinstance(names[-2], str) \
      and names[-2] != "__call__":
    parts.pop()  # a value sown once: its tuple's only entry
  return "/".join(parts) or "output"


def gradients_and_activations(state: TrainState, batch: Batch, key) -> tuple:
  """The gradient on ``batch`` (as a training step computes it, dropout keyed
  by ``key``) and :func:`activations` on its inputs, in one program (on one
  device, so models with cross-replica batch norm run too)."""
  from jaxtrain.engine.parallel import AXIS, P, on_one_device

  return on_one_device(_snapshot, (P(), P(AXIS), P()), (P(), P(AXIS)))(state, batch, key)


def _snapshot(state: TrainState, batch: Batch, key, *, axis_name: str):
  grads, _, _ = compute_gradients(state, batch, key, axis_name=axis_name)
  return grads, activations(state, batch["inputs"])
