"""Per-example losses that equal PyTorch's, numerically stable for large logits.

Every loss has the signature ``loss(outputs, targets) -> [batch]``: one value per
example, averaged over any trailing (non-batch, non-class) axes, the way
PyTorch's ``reduction="mean"`` averages over them. The mean over the batch is
left to the caller, which may weight or mask examples.

Shapes are checked at trace time (they are static under ``jit``): a single logit
column (outputs of shape ``targets.shape + (1,)``, e.g. ``[B, 1]`` against
``[B]``) is squeezed, and any other mismatch raises ``ValueError`` instead of
silently broadcasting ``[B, 1] - [B]`` to ``[B, B]``.

Accuracy belongs to a classification loss, not to a dtype: each of
:func:`cross_entropy`, :func:`binary_cross_entropy_with_logits` and :func:`hinge`
carries ``loss.accuracy(outputs, targets) -> [batch]``, the per-example accuracy
jaxtrain logs beside it (argmax against integer labels; the sign of a single
logit against 0/1 or -1/+1 targets). Any other loss, :func:`mse` and your own
included, logs no accuracy unless you give one (``create_train_state(...,
accuracy=fn)``, or :func:`with_accuracy`).

Example:
  >>> import jax.numpy as jnp
  >>> loss_fn = get_loss("cross_entropy")
  >>> losses = loss_fn(jnp.array([[2.0, 0.0], [0.0, 0.0]]), jnp.array([0, 1]))
  >>> [round(v, 4) for v in losses.tolist()]
  [0.1269, 0.6931]
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "LOSSES",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "get_loss",
    "hinge",
    "mse",
    "with_accuracy",
]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels.

  Equals ``torch.nn.CrossEntropyLoss(reduction="none")`` (no ``ignore_index``,
  no label smoothing) with the class axis last instead of second, averaged over
  trailing axes. Stable for any finite logits. Labels must lie in ``[0, C)``;
  out-of-range labels cannot be checked under ``jit`` and give nan.

  Args:
    logits: Unnormalized scores of shape ``[batch, ..., C]``.
    labels: Integer class labels of shape ``logits.shape[:-1]``.

  Returns:
    Per-example loss of shape ``[batch]``.

  Raises:
    ValueError: If the shapes do not fit or the labels are not integers.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[100.0, -100.0], [0.0, 0.0]])
    >>> [round(v, 4) for v in cross_entropy(logits, jnp.array([1, 0])).tolist()]
    [200.0, 0.6931]
  """
  logits, labels = _fit_shapes(logits, labels, class_axis=True)
  _check_integer("labels", labels)
  # log_softmax computes (x - max) - log(sum(exp(x - max))) like torch: no
  # overflow at +-100, and no cancellation either (logsumexp(x) - x[y] would
  # lose ~1e-5 when both are near 100, as optax's integer-label loss does).
  log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)
  # A one-hot select, not take_along_axis: elementwise forward and backward
  # (a gather's gradient is a scatter), so it fuses with the softmax.
  classes = log_probs.shape[-1]
  picked = jnp.arange(classes) == labels[..., None]
  losses = -jnp.sum(jnp.where(picked, log_probs, 0.0), axis=-1)
  losses = jnp.where((labels >= 0) & (labels < classes), losses, jnp.nan)
  return _mean_over_trailing_axes(losses)


def binary_cross_entropy_with_logits(
    logits: jax.Array, targets: jax.Array
) -> jax.Array:
  """Sigmoid binary cross-entropy on logits.

  Equals ``torch.nn.BCEWithLogitsLoss(reduction="none")`` averaged over
  trailing axes. Computes ``(1 - t) * x - log_sigmoid(x)`` like torch, which is
  the stable form ``max(x, 0) - x * t + log1p(exp(-|x|))`` rearranged: finite
  values and gradients for any finite logits.

  Args:
    logits: Logits of shape ``targets.shape`` or ``targets.shape + (1,)``.
    targets: Targets in [0, 1] (int, bool or float; cast to float), with a
      leading batch axis.

  Returns:
    Per-example loss of shape ``[batch]``.

  Raises:
    ValueError: If the shapes do not fit.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[0.0], [100.0], [-100.0]])
    >>> losses = binary_cross_entropy_with_logits(logits, jnp.array([1, 1, 1]))
    >>> [round(v, 4) for v in losses.tolist()]
    [0.6931, 0.0, 100.0]
  """
  logits, targets = _fit_shapes(logits, targets)
  x = _as_float(logits)
  t = targets.astype(x.dtype)
  # (1 - t) * x - log_sigmoid(x) is the stable max(x, 0) - x * t +
  # log1p(exp(-|x|)) rearranged, in torch's own form (so it rounds like torch).
  # log_sigmoid is computed stably, and unlike a literal max/abs version its
  # gradient at x = 0 is right (sigmoid(0) - t; jax's max and abs kinks are not).
  losses = (1 - t) * x - jax.nn.log_sigmoid(x)
  return _mean_over_trailing_axes(losses)


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Squared error, averaged over trailing axes.

  Equals ``torch.nn.MSELoss(reduction="none")`` averaged over trailing axes.

  Args:
    outputs: Predictions of shape ``targets.shape`` or ``targets.shape + (1,)``.
    targets: Regression targets with a leading batch axis (cast to the
      outputs' float dtype).

  Returns:
    Per-example loss of shape ``[batch]``.

  Raises:
    ValueError: If the shapes do not fit.

  Example:
    >>> import jax.numpy as jnp
    >>> outputs = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    >>> mse(outputs, jnp.array([[1.0, 0.0], [3.0, 1.0]])).tolist()
    [2.0, 5.0]
  """
  outputs, targets = _fit_shapes(outputs, targets)
  x = _as_float(outputs)
  return _mean_over_trailing_axes(jnp.square(x - targets.astype(x.dtype)))


def hinge(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Hinge loss, binary or multi-class.

  * Binary, when there is one output per target (shape ``targets.shape`` or
    ``targets.shape + (1,)``): targets are 0/1 or -1/+1, mapped to
    ``y = -1 if t <= 0 else +1``; the loss is ``max(0, 1 - y * x)``.
  * Multi-class, when the outputs have a trailing class axis of size ``C > 1``
    and the targets are integer labels of shape ``outputs.shape[:-1]``: equals
    ``torch.nn.MultiMarginLoss(reduction="none")``,
    ``sum over i != y of max(0, 1 - x[y] + x[i]) / C``.

  Either way the result is averaged over trailing axes.

  Args:
    outputs: Scores, ``targets.shape`` (+ ``(1,)``) or ``targets.shape + (C,)``.
    targets: Binary targets, or integer labels in ``[0, C)``.

  Returns:
    Per-example loss of shape ``[batch]``.

  Raises:
    ValueError: If the shapes do not fit, or multi-class targets are not
      integers.

  Example:
    >>> import jax.numpy as jnp
    >>> hinge(jnp.array([0.5, -2.0, 3.0]), jnp.array([1, 0, -1])).tolist()
    [0.5, 0.0, 4.0]
    >>> multi_class = hinge(jnp.array([[0.1, 0.2, 0.4, 0.8]]), jnp.array([3]))
    >>> [round(v, 4) for v in multi_class.tolist()]
    [0.325]
  """
  outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
  multi_class = outputs.ndim == targets.ndim + 1 and outputs.shape[-1] != 1
  outputs, targets = _fit_shapes(outputs, targets, class_axis=multi_class)
  x = _as_float(outputs)
  if not multi_class:
    y = jnp.where(targets > 0, 1.0, -1.0).astype(x.dtype)
    return _mean_over_trailing_axes(jnp.maximum(0, 1 - y * x))
  _check_integer("targets", targets)
  num_classes = x.shape[-1]
  x_target = jnp.take_along_axis(x, targets[..., None], axis=-1)
  margins = jnp.maximum(0, 1 - x_target + x)
  # The i == y term would contribute max(0, 1) = 1; torch leaves it out.
  is_target = jnp.arange(num_classes) == targets[..., None]
  losses = jnp.sum(jnp.where(is_target, 0, margins), axis=-1) / num_classes
  return _mean_over_trailing_axes(losses)


def _class_accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """``argmax(outputs, -1) == labels``, averaged over trailing axes: [batch]."""
  return _mean_over_trailing_axes((jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32))


def _sign_accuracy(threshold: float):
  def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    outputs, targets = _fit_shapes(outputs, targets)
    correct = (outputs > 0) == (targets.astype(jnp.float32) > threshold)
    return _mean_over_trailing_axes(correct.astype(jnp.float32))
  return accuracy


def _hinge_accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
  if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] != 1:
    return _class_accuracy(outputs, targets)
  return _sign_accuracy(0.0)(outputs, targets)


cross_entropy.accuracy = _class_accuracy
# Targets in [0, 1]: the positive class is a target above one half.
binary_cross_entropy_with_logits.accuracy = _sign_accuracy(0.5)
hinge.accuracy = _hinge_accuracy


@dataclasses.dataclass(frozen=True)
class WithAccuracy:
  """A loss that logs an accuracy beside it (see :func:`with_accuracy`); equal
  loss and accuracy functions make equal losses, so compiled programs are
  shared."""

  loss_fn: LossFn
  accuracy: Callable[[jax.Array, jax.Array], jax.Array]

  def __call__(self, outputs, targets):
    return self.loss_fn(outputs, targets)

  @property
  def __name__(self):
    return getattr(self.loss_fn, "__name__", "loss")


def with_accuracy(loss_fn: LossFn, accuracy: Callable[[jax.Array, jax.Array], jax.Array]
                  ) -> LossFn:
  """``loss_fn`` that logs ``accuracy(outputs, targets) -> [batch]`` (values
  in [0, 1]) beside it, e.g. a loss of your own wrapping :func:`cross_entropy`.

  >>> import jax.numpy as jnp
  >>> loss = with_accuracy(lambda out, y: cross_entropy(out[0], y),
  ...                      lambda out, y: cross_entropy.accuracy(out[0], y))
  >>> loss.accuracy((jnp.array([[2.0, 0.0], [0.0, 1.0]]), None), jnp.array([0, 0])).tolist()
  [1.0, 0.0]
  """
  if not callable(loss_fn) or not callable(accuracy):
    raise ValueError(f"with_accuracy takes two callables, got {loss_fn!r} and {accuracy!r}")
  return WithAccuracy(loss_fn, accuracy)


#: Losses by name, for picking one from a config or the command line.
LOSSES: types.MappingProxyType[str, LossFn] = types.MappingProxyType(
    {
        "cross_entropy": cross_entropy,
        "bce": binary_cross_entropy_with_logits,
        "mse": mse,
        "hinge": hinge,
    }
)


def get_loss(name: str) -> LossFn:
  """Returns the loss registered under ``name`` in :data:`LOSSES`.

  Args:
    name: One of ``"cross_entropy"``, ``"bce"``, ``"mse"``, ``"hinge"``.

  Returns:
    The loss function.

  Raises:
    ValueError: If ``name`` is unknown; the message lists the valid names.

  Example:
    >>> get_loss("bce").__name__
    'binary_cross_entropy_with_logits'
  """
  if name not in LOSSES:
    raise ValueError(f"name must be one of {sorted(LOSSES)}, got {name!r}")
  return LOSSES[name]


def _fit_shapes(
    outputs: jax.Array, targets: jax.Array, *, class_axis: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Checks (and for a single logit column, fixes) the shapes of a loss's inputs.

  Args:
    outputs: The model outputs.
    targets: The targets.
    class_axis: Whether ``outputs`` carry a trailing class axis that
      ``targets`` (integer labels) lack.

  Returns:
    ``(outputs, targets)`` as arrays, with ``outputs`` squeezed to the targets'
    shape when it was ``targets.shape + (1,)`` and ``class_axis`` is False.

  Raises:
    ValueError: If the shapes do not fit, naming both, or there is no batch
      axis.
  """
  outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
  given = outputs.shape
  if outputs.ndim == 0:
    raise ValueError(f"outputs must have a batch axis, got shape {given}")
  if class_axis:
    fits = targets.shape == given[:-1]
  else:
    if given == targets.shape + (1,):
      # A [B, 1] logit column against [B] targets would otherwise broadcast
      # to a [B, B] loss matrix: a classic silent bug.
      outputs = outputs[..., 0]
    fits = outputs.shape == targets.shape
  if not fits:
    raise ValueError(
        f"targets of shape {targets.shape} do not fit outputs of shape {given}"
    )
  if targets.ndim == 0:
    raise ValueError(
        f"outputs must have a batch axis, got shape {given} for targets of shape ()"
    )
  return outputs, targets


def _check_integer(arg: str, labels: jax.Array) -> None:
  """Raises ValueError unless ``labels`` has an integer dtype."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{arg} must be integer class labels, got dtype {labels.dtype}")


def _as_float(x: jax.Array) -> jax.Array:
  """Returns ``x`` in its own float dtype, or the default float for int/bool."""
  return x.astype(jnp.result_type(x.dtype, float))


def _mean_over_trailing_axes(losses: jax.Array) -> jax.Array:
  """Averages ``[batch, ...]`` losses to ``[batch]``."""
  return jnp.mean(losses, axis=tuple(range(1, losses.ndim)))
