"""Gradient transformations that round exactly like PyTorch's.

``clip_by_global_norm_torch`` is ``torch.nn.utils.clip_grad_norm_`` and
``scale_by_adam_torch`` is the direction of ``torch.optim.Adam``; both are
optax ``GradientTransformation``s, chained by :func:`jaxtrain.make_optimizer`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# torch.nn.utils.clip_grad_norm_ adds this to the total norm before dividing.
_TORCH_CLIP_EPS = 1e-6


class ClipByGlobalNormTorchState(NamedTuple):
  """``clip_by_global_norm_torch`` is stateless."""


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """Clips gradients by their global norm exactly like PyTorch.

  Equals ``torch.nn.utils.clip_grad_norm_(params, max_norm)``: every gradient
  is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``, where
  ``total_norm`` is the 2-norm of all gradients together. Unlike
  ``optax.clip_by_global_norm`` this includes torch's ``1e-6``, so a gradient
  whose norm equals ``max_norm`` is scaled by ``max_norm / (max_norm + 1e-6)``
  instead of being left alone. When the factor is 1 the multiplication is
  exact, so unclipped gradients come out bit-identical.

  Args:
    max_norm: Largest allowed global 2-norm; must be > 0.

  Returns:
    A stateless ``optax.GradientTransformation``.

  Raises:
    ValueError: If ``max_norm`` is not a finite number > 0.

  Example:
    >>> import jax.numpy as jnp
    >>> clip = clip_by_global_norm_torch(1.0)
    >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> clipped, _ = clip.update(grads, clip.init(grads))
    >>> round(float(clipped["a"][0]), 4), round(float(clipped["b"][0]), 4)
    (0.6, 0.8)
  """
  max_norm = check_number("max_norm", max_norm, low=0.0, low_inclusive=False)

  def init_fn(params):
    del params
    return ClipByGlobalNormTorchState()

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree_util.tree_leaves(updates)
    if not leaves:
      return updates, state
    # Norm of the per-leaf norms, the order torch reduces in, computed in
    # at least float32 so low-precision gradients do not overflow. The
    # product below is also formed in that precision before rounding back
    # to the gradient's dtype, as torch's in-place mul_ does.
    norm_dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    leaf_norms = jnp.stack(
        [jnp.linalg.norm(jnp.ravel(g).astype(norm_dtype)) for g in leaves]
    )
    total_norm = jnp.linalg.norm(leaf_norms)
    # torch evaluates `max_norm / tensor` as `max_norm * tensor.reciprocal()`,
    # which can round differently from a division; do the same to match bits.
    factor = jnp.minimum(max_norm * jnp.reciprocal(total_norm + _TORCH_CLIP_EPS), 1.0)
    clipped = jax.tree_util.tree_map(lambda g: (g * factor).astype(g.dtype), updates)
    return clipped, state

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamTorchState(NamedTuple):
  """State of ``scale_by_adam_torch``: step count and the two moments."""

  count: jax.Array  # int32 scalar: number of updates so far.
  mu: Any
  nu: Any


def scale_by_adam_torch(
    b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
  """Adam's direction ``m_hat / (sqrt(v_hat) + eps)``, rounded like torch.

  ``optax.scale_by_adam`` computes the bias correction ``1 - b2**t`` in
  float32, where ``b2 = 0.999`` loses ~1e-5 relative accuracy to cancellation
  (torch computes it in float64). ``-expm1(t * log(b))`` is accurate to ~1e-7
  in float32, which keeps us within float32 rounding of torch. The moment
  updates follow torch's ``lerp_`` / ``addcmul_`` forms for the same reason.
  """
  log_b1 = math.log(b1) if b1 > 0 else -math.inf
  log_b2 = math.log(b2) if b2 > 0 else -math.inf

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
    return ScaleByAdamTorchState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree_util.tree_map(zeros, params),
        nu=jax.tree_util.tree_map(zeros, params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    # At least float32 (bfloat16 would round the corrections badly); the
    # moments stay in the params' dtype, like torch's exp_avg / exp_avg_sq.
    dtype = jnp.result_type(jnp.float32, *jax.tree_util.tree_leaves(updates))
    t = count.astype(dtype)
    bias_correction1 = -jnp.expm1(t * log_b1)
    sqrt_bias_correction2 = jnp.sqrt(-jnp.expm1(t * log_b2))
    # Cast back so the state keeps its dtypes (a jit/scan carry must not change).
    mu = jax.tree_util.tree_map(
        lambda m, g: (m + (1 - b1) * (g - m)).astype(m.dtype), state.mu, updates
    )
    nu = jax.tree_util.tree_map(
        lambda v, g: (v * b2 + (1 - b2) * g * g).astype(v.dtype), state.nu, updates
    )

    def direction(m, v):
      denom = jnp.sqrt(v) / sqrt_bias_correction2 + eps
      return (m / denom / bias_correction1).astype(m.dtype)

    updates = jax.tree_util.tree_map(direction, mu, nu)
    return updates, ScaleByAdamTorchState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def check_number(
    arg: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
) -> float:
  """Returns ``value`` as a float, or raises ValueError naming ``arg``.

  ``value`` must be finite (nan and inf are rejected) and lie in
  ``[low, high)``, or ``(low, high)`` if not ``low_inclusive``.
  """
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, numbers.Real) or (np.ndim(value) == 0 and _is_real(value))
  ):
    raise ValueError(f"{arg} must be a real number, got {value!r}")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{arg} must be finite, got {value}")
  below = low is not None and (value < low if low_inclusive else value <= low)
  above = high is not None and value >= high
  if below or above:
    if high is None:
      op = ">=" if low_inclusive else ">"
      raise ValueError(f"{arg} must be {op} {low:g}, got {value}")
    bracket = "[" if low_inclusive else "("
    raise ValueError(f"{arg} must be in {bracket}{low:g}, {high:g}), got {value}")
  return value


def _is_real(value: Any) -> bool:
  """Whether a 0-d array-like holds a real (non-complex, non-bool) number."""
  try:
    dtype = np.asarray(value).dtype
  except Exception:  # e.g. a tracer or an arbitrary object
    return False
  return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
