"""Regularisation in the loss: L1 and L2 penalty terms and input noise.

These are the lesson's terms, added to the data loss the gradient is taken of,
and distinct from an optimizer's weight decay:

* ``l2 * sum(p ** 2)`` over every parameter (biases and batch-norm scales
  included, as ``sum(p.pow(2).sum() for p in model.parameters())`` in PyTorch).
  With plain SGD it equals ``weight_decay = 2 * l2``; with Adam it is divided
  by the moments like the data gradient (Adam's ``weight_decay`` adds the same
  gradient), while AdamW's decoupled decay bypasses them.
* ``l1 * sum(|p|)``, which pushes weights to exactly zero.
* ``input_noise``: Gaussian noise of this standard deviation added to the
  training inputs (never to evaluations), drawn from the step's key and each
  row's position in the global batch, so it differs per step and row, is the
  same on any number of devices and is a pure function of the run's seed.

The penalty is logged beside the data loss: ``penalty`` per step, and
``train_penalty`` (its epoch mean) in metrics.csv, TensorBoard and curves.png;
``loss`` stays the data loss, comparable with the validation loss.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

__all__ = ["Regularization"]


@dataclasses.dataclass(frozen=True)
class Regularization:
  """L1/L2 penalty terms and input noise (see the module's docstring).

  Experiments nest it in their configs: flags ``--l1``, ``--l2``,
  ``--input-noise``. Give it to :func:`jaxtrain.create_train_state`
  (``regularization=``); :func:`jaxtrain.train_step` then minimises
  ``loss + penalty``.

  >>> import jax.numpy as jnp
  >>> reg = Regularization(l1=0.1, l2=0.01)
  >>> round(float(reg.penalty({"w": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])})), 4)
  0.74
  """

  l1: float = 0.0  # L1 penalty: adds l1 * sum(|w|) over every parameter to the loss.
  l2: float = 0.0  # L2 penalty: adds l2 * sum(w**2) over every parameter (not weight decay).
  input_noise: float = 0.0  # Std of Gaussian noise added to training inputs (0: none).

  def __post_init__(self):
    for name in ("l1", "l2", "input_noise"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int | float) or not (
          math.isfinite(value) and value >= 0):
        flag = name.replace("_", "-")
        raise ValueError(f"--{flag} must be a finite number >= 0, got {value!r}")

  @property
  def penalizes(self) -> bool:
    """Whether there is a penalty term (``l1`` or ``l2`` above 0)."""
    return self.l1 > 0 or self.l2 > 0

  def penalty(self, params) -> jax.Array:
    """``l1 * sum(|p|) + l2 * sum(p ** 2)`` over the leaves of ``params`` (fp32)."""
    leaves = [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)]
    total = jnp.zeros((), jnp.float32)
    if self.l1 > 0:
      # |p| as p * sign(p): the subgradient at 0 is 0, as torch's abs (jax's is 1).
      total += self.l1 * sum(jnp.sum(p * jax.lax.stop_gradient(jnp.sign(p))) for p in leaves)
    if self.l2 > 0:
      total += self.l2 * sum(jnp.sum(p * p) for p in leaves)
    return total

  def noisy(self, inputs: jax.Array, key, first_row) -> jax.Array:
    """``inputs`` plus noise; row ``i`` draws from ``fold_in(key, first_row + i)``."""
    if self.input_noise == 0:
      return inputs
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise ValueError(f"--input-noise {self.input_noise} needs float inputs, got "
                       f"{inputs.dtype} inputs")
    rows = first_row + jnp.arange(inputs.shape[0])
    noise = jax.vmap(lambda row: jax.random.normal(
        jax.random.fold_in(key, row), inputs.shape[1:], jnp.float32))(rows)
    return (inputs + self.input_noise * noise).astype(inputs.dtype)
