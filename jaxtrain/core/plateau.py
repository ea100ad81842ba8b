"""PyTorch's ReduceLROnPlateau as a pure function of a small state.

``torch.optim.lr_scheduler.ReduceLROnPlateau`` lowers the learning rate by
``factor`` once the monitored metric has not improved for more than
``patience`` epochs, then waits ``cooldown`` epochs. Here the scheduler's
state is a :class:`PlateauState` pytree kept in the
:class:`~jaxtrain.TrainState` (``state.plateau``): its ``scale`` multiplies
every optimizer update (the learning rate being the last factor of SGD, Adam
and AdamW updates, that is scaling the learning rate), and it is checkpointed,
resumed and continued with the state. ``fit`` steps it at every epoch end on
the device from the monitored evaluation mean (``FitConfig(reduce_lr_on_plateau=...)``);
your own loop calls :func:`step` with the value once per epoch:

>>> import jax, jax.numpy as jnp
>>> rule = ReduceLROnPlateau(factor=0.5, patience=1)
>>> plateau = init(rule)
>>> for val_loss in [1.0, 0.9, 0.95, 0.95, 0.95]:
...   plateau = step(rule, plateau, val_loss, learning_rate=0.1)
>>> round(float(plateau.scale), 4), int(plateau.bad_epochs)
(0.5, 1)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ReduceLROnPlateau:
  """``torch.optim.lr_scheduler.ReduceLROnPlateau``'s rule, field for field.

  Attributes:
    monitor: the metrics.csv column it watches: an evaluation mean
      (``val_loss``, ``val_accuracy``, ``train_loss`` or your own metric's).
    mode: ``"min"`` (lower is better) or ``"max"``.
    factor: the learning rate's multiplier at each reduction (< 1).
    patience: bad epochs tolerated; the rate drops after ``patience + 1``.
    threshold: how much better counts as better.
    threshold_mode: ``"rel"`` (better than ``best * (1 -+ threshold)``, as
      PyTorch computes it also for negative values) or ``"abs"`` (``best -+
      threshold``).
    cooldown: epochs after a reduction during which bad epochs are not counted.
    min_lr: the learning rate never drops below it.
    eps: a reduction smaller than this is not applied.
  """

  monitor: str = "val_loss"
  mode: str = "min"
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  threshold_mode: str = "rel"
  cooldown: int = 0
  min_lr: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    def bad(name, why):
      raise ValueError(f"reduce_lr_on_plateau {name} {why}, got {getattr(self, name)!r}")

    if self.mode not in ("min", "max"):
      bad("mode", "must be 'min' or 'max'")
    if self.threshold_mode not in ("rel", "abs"):
      bad("threshold_mode", "must be 'rel' or 'abs'")
    if not 0.0 <= self.factor < 1.0:
      bad("factor", "must be in [0, 1)")
    for name in ("patience", "cooldown"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        bad(name, "must be an integer >= 0")
    for name in ("threshold", "min_lr", "eps"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        bad(name, "must be a finite number >= 0")


class PlateauState(NamedTuple):
  """The scheduler's state (float32/int32 scalars, or batched).

  Attributes:
    scale: the learning rate's multiplier so far (1 until the first reduction).
    best: the best monitored value so far (+-inf before the first epoch).
    bad_epochs: epochs since the last improvement (PyTorch's ``num_bad_epochs``).
    cooldown: epochs of cooldown left (``cooldown_counter``).
  """

  scale: jax.Array
  best: jax.Array
  bad_epochs: jax.Array
  cooldown: jax.Array


def init(rule: ReduceLROnPlateau) -> PlateauState:
  """The state before any epoch."""
  return PlateauState(jnp.ones((), jnp.float32),
                      jnp.asarray(math.inf if rule.mode == "min" else -math.inf, jnp.float32),
                      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def is_better(rule: ReduceLROnPlateau, value, best):
  """PyTorch's ``is_better``: NaN never is."""
  f32 = np.float32
  if rule.mode == "min":
    bound = best * f32(1.0 - rule.threshold) if rule.threshold_mode == "rel" else (
        best - f32(rule.threshold))
    return value < bound
  bound = best * f32(rule.threshold + 1.0) if rule.threshold_mode == "rel" else (
      best + f32(rule.threshold))
  return value > bound


def step(rule: ReduceLROnPlateau, state: PlateauState, value, learning_rate=math.nan
         ) -> PlateauState:
  """The state after an epoch whose monitored metric is ``value``.

  ``learning_rate`` is the optimizer's own rate (before ``scale``), which
  ``min_lr`` and ``eps`` compare with; NaN (an optimizer without an injected
  learning rate) compares them with the scale itself.
  """
  value = jnp.asarray(value, jnp.float32)
  base = jnp.asarray(learning_rate, jnp.float32)
  base = jnp.where(jnp.isnan(base), jnp.float32(1.0), base)
  better = is_better(rule, value, state.best)
  best = jnp.where(better, value, state.best)
  bad_epochs = jnp.where(better, 0, state.bad_epochs + 1)
  cooling = state.cooldown > 0
  cooldown = jnp.where(cooling, state.cooldown - 1, state.cooldown)
  bad_epochs = jnp.where(cooling, 0, bad_epochs)
  reduce = bad_epochs > rule.patience
  old = base * state.scale
  lowered = old * np.float32(rule.factor)
  floor = np.float32(rule.min_lr)
  new = jnp.maximum(lowered, floor)
  # scale * factor (exact products of the factor) unless min_lr clamps it.
  scaled = jnp.where(lowered >= floor, state.scale * np.float32(rule.factor), floor / base)
  scale = jnp.where(reduce & (old - new > np.float32(rule.eps)), scaled, state.scale)
  return PlateauState(scale.astype(jnp.float32), best.astype(jnp.float32),
                      jnp.where(reduce, 0, bad_epochs).astype(jnp.int32),
                      jnp.where(reduce, rule.cooldown, cooldown).astype(jnp.int32))
