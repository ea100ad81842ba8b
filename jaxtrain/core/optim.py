"""Optax optimizers whose update rules equal PyTorch's ``torch.optim`` exactly.

``make_optimizer`` builds SGD (with momentum / Nesterov), Adam and AdamW with
the same weight-decay and gradient-clipping semantics as PyTorch, so results
and hyperparameters transfer between the two frameworks. The learning rate and
the weight decay are injected into the optimizer state
(``opt_state.hyperparams``) so they can be logged, changed between steps, or
vmapped over.

Example:
  >>> import jax.numpy as jnp
  >>> import optax
  >>> tx = make_optimizer("sgd", 0.1, momentum=0.9)
  >>> params = {"w": jnp.array([1.0, 2.0])}
  >>> opt_state = tx.init(params)
  >>> grads = {"w": jnp.array([0.5, -0.5])}
  >>> updates, opt_state = tx.update(grads, opt_state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> [round(w, 3) for w in params["w"].tolist()]
  [0.95, 2.05]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain.core.transforms import (
  ClipByGlobalNormTorchState,
  ScaleByAdamTorchState,
  check_number,
  clip_by_global_norm_torch,
  scale_by_adam_torch,
)

__all__ = [
    "OPTIMIZERS",
    "ClipByGlobalNormTorchState",
    "OptimizerConfig",
    "ScaleByAdamTorchState",
    "clip_by_global_norm_torch",
    "current_learning_rate",
    "make_optimizer",
    "no_bias_norm_mask",
]

#: Optimizer names accepted by :func:`make_optimizer`.
OPTIMIZERS = ("sgd", "adam", "adamw")

# Leaf names that are never weight-decayed by ``no_bias_norm_mask``.
_NO_DECAY_NAMES = frozenset({"bias", "scale"})

# Names of the attribute that flax.nnx Variables expose their array under; a
# path ending in it is named after the key before it (e.g. ".../bias/value").
_VALUE_ATTRS = frozenset({"value", "raw_value"})


def no_bias_norm_mask(params: Any) -> Any:
  """Weight-decay mask that skips biases and normalization parameters.

  A leaf is decayed (``True``) unless its name is ``"bias"`` or ``"scale"``
  or it has fewer than 2 dimensions, which covers biases and LayerNorm /
  BatchNorm scales and offsets. Kernels and embeddings are decayed. Works on
  plain dicts (``flax.linen`` params) and ``flax.nnx`` states.

  Args:
    params: Parameter pytree.

  Returns:
    A pytree of bools with the structure of ``params``; pass it (or this
    function itself) as ``weight_decay_mask`` to :func:`make_optimizer`.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    ...           "norm": {"scale": jnp.ones(4)}}
    >>> no_bias_norm_mask(params)
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
  """

  def decay(path, leaf) -> bool:
    name = _leaf_name(path)
    return not (name in _NO_DECAY_NAMES or np.ndim(leaf) < 2)

  return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    clip_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds an optimizer with exactly PyTorch's update rule.

  * ``"sgd"`` equals ``torch.optim.SGD(lr, momentum, nesterov=nesterov,
    weight_decay=weight_decay)`` (dampening 0): ``g += wd * p``;
    ``b = momentum * b + g`` (``b = g`` on the first step);
    ``d = g + momentum * b`` if ``nesterov`` else ``b``; ``p -= lr * d``.
  * ``"adam"`` equals ``torch.optim.Adam``: the coupled L2 term ``wd * p`` is
    added to the gradient, then Adam with bias correction,
    ``p -= lr * m_hat / (sqrt(v_hat) + eps)``.
  * ``"adamw"`` equals ``torch.optim.AdamW``: decoupled decay scaled by the
    learning rate, ``p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``.

  If ``clip_norm`` is set, gradients are first clipped like
  ``torch.nn.utils.clip_grad_norm_`` (see :func:`clip_by_global_norm_torch`),
  before weight decay is added, as in a torch loop that clips ``p.grad``
  before ``optimizer.step()``.

  The chain is wrapped in ``optax.inject_hyperparams``, so ``opt_state`` is an
  ``optax.InjectStatefulHyperparamsState`` whose ``hyperparams`` dict holds
  ``"learning_rate"`` and ``"weight_decay"`` as scalar arrays (in the params'
  highest float dtype, optax's default), and whose ``inner_state`` is the
  chain's tuple of states. They may be read (see
  :func:`current_learning_rate`), overwritten between steps, or vmapped over.
  A schedule for ``learning_rate`` is evaluated at the step count before each
  update (and overwrites any manual change). Every other argument is static.
  Weight decay is always part of the chain, so that the injected value is
  live even when it starts at 0; hence ``update`` must be given ``params``.

  Args:
    name: ``"sgd"``, ``"adam"`` or ``"adamw"`` (case-insensitive).
    learning_rate: A float > 0, or an optax schedule (``step -> lr``).
    momentum: SGD momentum in [0, 1); must be 0 for Adam/AdamW, whose
      momentum is ``b1``.
    nesterov: Use Nesterov momentum (SGD only; needs ``momentum > 0``).
    b1: Adam's first-moment decay in [0, 1).
    b2: Adam's second-moment decay in [0, 1).
    eps: Adam's epsilon (added outside the square root), >= 0.
    weight_decay: L2 coefficient (coupled for sgd/adam, decoupled for
      adamw), >= 0.
    weight_decay_mask: Which leaves are decayed: a pytree of bools shaped
      like the params, or a callable ``params -> such pytree`` (e.g.
      :func:`no_bias_norm_mask`). ``None`` decays every leaf.
    clip_norm: Max global gradient norm, > 0; ``None`` disables clipping.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``.

  Raises:
    ValueError: If an argument is invalid; the message names it and the
      offending value.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> tx = make_optimizer("adamw", 1e-3, weight_decay=0.01)
    >>> params = {"w": jnp.ones(2)}
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update({"w": jnp.ones(2)}, opt_state, params)
    >>> [round(w, 5) for w in optax.apply_updates(params, updates)["w"].tolist()]
    [0.99899, 0.99899]
    >>> round(float(opt_state.hyperparams["learning_rate"]), 6)
    0.001
  """
  if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
    raise ValueError(f"optimizer name must be one of {list(OPTIMIZERS)}, got {name!r}")
  name = name.lower()
  if not callable(learning_rate):
    learning_rate = check_number(
        "learning_rate", learning_rate, low=0.0, low_inclusive=False
    )
  momentum = check_number("momentum", momentum, low=0.0, high=1.0)
  b1 = check_number("b1", b1, low=0.0, high=1.0)
  b2 = check_number("b2", b2, low=0.0, high=1.0)
  eps = check_number("eps", eps, low=0.0)
  weight_decay = check_number("weight_decay", weight_decay, low=0.0)
  if clip_norm is not None:
    clip_norm = check_number("clip_norm", clip_norm, low=0.0, low_inclusive=False)
  if not isinstance(nesterov, (bool, np.bool_)):
    raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
  if name == "sgd":
    if nesterov and momentum == 0.0:
      # Same rule as torch.optim.SGD: Nesterov without momentum is plain
      # SGD in disguise, almost certainly a configuration mistake.
      raise ValueError(f"nesterov=True requires momentum > 0, got momentum={momentum}")
  else:
    if momentum != 0.0:
      raise ValueError(
          f"momentum must be 0 for {name} (use b1 for Adam's momentum), "
          f"got {momentum}"
      )
    if nesterov:
      raise ValueError(f"nesterov must be False for {name}, got {nesterov}")

  def chain(learning_rate, weight_decay) -> optax.GradientTransformation:
    # Receives the injected (possibly traced) learning rate and weight
    # decay; everything else is closed over so it stays static.
    decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)
    steps = [clip_by_global_norm_torch(clip_norm)] if clip_norm else []
    if name == "sgd":
      # torch adds the L2 term before the momentum buffer sees the grad.
      steps.append(decay)
      if momentum:
        # optax.trace: b = mu * b + g with b0 = 0, i.e. b = g on the
        # first step, and g + mu * b for nesterov, as in torch.
        steps.append(optax.trace(decay=momentum, nesterov=nesterov))
    elif name == "adam":
      steps += [decay, scale_by_adam_torch(b1, b2, eps)]
    else:  # adamw: decay is added after Adam, so it is scaled by lr only.
      steps += [scale_by_adam_torch(b1, b2, eps), decay]
    steps.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*steps)

  tx = optax.inject_hyperparams(chain)(
      learning_rate=learning_rate, weight_decay=weight_decay
  )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      # Fail with a clear message rather than deep inside optax.
      raise ValueError(
          "params must be passed to update() (needed for weight decay "
          "and the hyperparameter dtype), got None"
      )
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def current_learning_rate(opt_state: Any, default: float | None = None) -> jax.Array:
  """Returns the learning rate held in an optimizer state, for logging.

  With a schedule this is the learning rate the most recent update used
  (before the first update: the one the first update will use).

  Args:
    opt_state: State of a :func:`make_optimizer` optimizer, possibly nested
      inside other optax states (e.g. ``optax.MultiSteps``).
    default: returned (as a float32 array) when ``opt_state`` holds no
      injected learning rate, e.g. a plain ``optax.sgd``; None raises.

  Returns:
    The learning rate as an array: a scalar, or one value per vmapped
    optimizer when the state is batched.

  Raises:
    ValueError: If ``opt_state`` holds no injected ``learning_rate``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = make_optimizer("sgd", lambda step: 0.1 / (1 + step))
    >>> params = {"w": jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):
    ...     _, opt_state = tx.update({"w": jnp.ones(2)}, opt_state, params)
    >>> round(float(current_learning_rate(opt_state)), 4)
    0.0333
  """

  def has_lr(x) -> bool:
    return isinstance(getattr(x, "hyperparams", None), dict) and (
        "learning_rate" in x.hyperparams
    )

  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=has_lr):
    if has_lr(node):
      return node.hyperparams["learning_rate"]
  if default is not None:
    return jnp.asarray(default, jnp.float32)
  raise ValueError(
      f"opt_state holds no injected 'learning_rate' hyperparameter, got "
      f"{type(opt_state).__name__}"
  )


def _leaf_name(path) -> str | None:
  """Returns the last string key of a pytree path, skipping nnx ``.value``."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
      return key.key
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name in _VALUE_ATTRS:
        continue
      return key.name
  return None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The choices of make_optimizer() that experiments expose as flags.

  Experiments nest it in their configs (flags ``--optimizer``,
  ``--learning-rate``, ...), each with its own defaults.

  >>> import jax.numpy as jnp
  >>> tx = OptimizerConfig("adamw", 1e-3, weight_decay=0.01).make()
  >>> round(float(tx.init({"w": jnp.ones(2)}).hyperparams["weight_decay"]), 4)
  0.01
  """

  optimizer: str = "sgd"  # sgd, adam or adamw.
  learning_rate: float = 0.1  # Step size (the peak of a schedule).
  momentum: float = 0.0  # SGD momentum (sgd only).
  weight_decay: float = 0.0  # L2 (sgd, adam) or decoupled (adamw) weight decay.
  clip_norm: float | None = None  # Clip the global gradient norm to this.
  # Adam's epsilon, added to sqrt(v) (adam, adamw): 1e-8 as PyTorch; larger (1e-4)
  # for float16 state. Recorded in config.json only when set.
  eps: float = dataclasses.field(default=1e-8, metadata={"recorded_when_set": True})

  def make(self, schedule: optax.Schedule | None = None,
           **kwargs) -> optax.GradientTransformationExtraArgs:
    """The optimizer; ``schedule`` replaces the constant learning rate, and
    ``kwargs`` go to :func:`make_optimizer` (e.g. ``weight_decay_mask``)."""
    return make_optimizer(self.optimizer, schedule or self.learning_rate,
                          momentum=self.momentum, weight_decay=self.weight_decay,
                          clip_norm=self.clip_norm, eps=self.eps, **kwargs)
