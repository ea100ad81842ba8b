"""Mixed precision: compute in bfloat16 or float16, keep float32 master weights.

``precision="bf16"`` or ``"fp16"`` (:func:`jaxtrain.create_train_state`,
flag ``--precision``) casts the parameters and float inputs to the low dtype
for the forward and backward pass; the loss, the gradients (cast back by
autodiff), the parameters, the optimizer state, batch-norm statistics and the
EMA stay float32, so small updates are not rounded away and Adam's ``eps``
keeps its value (in float16 ``1e-8`` is 0; see :func:`jaxtrain.make_optimizer`).

bfloat16 has float32's range and needs no scaling. float16's largest value is
65504 and its smallest normal 6e-5, so gradients are computed of the loss
times a dynamic **loss scale** (as ``torch.amp.GradScaler``): when a scaled
gradient overflows, the update is skipped and the scale halved; after
``growth_interval`` finite steps in a row it doubles. The scale is part of the
state (checkpointed, so a resume is exact) and logged per step as
``loss_scale``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(precision: str):
  """The dtype a precision computes in (``"fp32"``, ``"bf16"``, ``"fp16"``)."""
  if precision not in PRECISIONS:
    raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                     f"{precision!r}")
  return PRECISIONS[precision]


def cast_floats(tree, dtype):
  """Casts the floating leaves of ``tree`` to ``dtype`` (others unchanged)."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


class LossScale(struct.PyTreeNode):
  """float16's dynamic loss scale (``torch.amp.GradScaler``'s rule and defaults).

  Attributes:
    scale: the factor the loss is multiplied by before differentiation.
    good_steps: finite steps since the last change.
    growth_interval: finite steps in a row before the scale doubles (static).

  >>> s, scales = LossScale.create(init_scale=8.0, growth_interval=2), []
  >>> for finite in (True, True, False, True):
  ...   s = s.update(finite)
  ...   scales.append(float(s.scale))
  >>> scales
  [8.0, 16.0, 8.0, 8.0]
  """

  scale: jax.Array
  good_steps: jax.Array
  growth_interval: int = struct.field(pytree_node=False, default=2000)

  @classmethod
  def create(cls, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> LossScale:
    if not init_scale > 0 or growth_interval < 1:
      raise ValueError(f"loss scale needs init_scale > 0 and growth_interval >= 1, got "
                       f"{init_scale} and {growth_interval}")
    return cls(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32),
               int(growth_interval))

  def update(self, finite) -> LossScale:
    """The scale after a step whose unscaled gradients were ``finite`` or not."""
    grown = self.good_steps + 1 >= self.growth_interval
    scale = jnp.where(finite, jnp.where(grown, self.scale * 2.0, self.scale), self.scale * 0.5)
    good = jnp.where(finite & ~grown, self.good_steps + 1, 0)
    return self.replace(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))
