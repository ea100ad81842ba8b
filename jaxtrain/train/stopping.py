"""Early stopping on a monitored metric, as a pure value updated once per epoch,
and the ranking that names a run's best epoch."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Ranking:
  """How epochs are ranked to name the best one: by ``monitor`` (a metrics.csv
  column), lower (``"min"``) or higher (``"max"``) being better by more than
  ``min_delta``. Early stopping's rule when there is one, else the
  checkpoint's monitor, else ``val_loss``."""

  monitor: str = "val_loss"
  mode: str = "min"
  min_delta: float = 0.0


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """When to stop: ``patience`` epochs without an improvement of ``monitor``.

  An epoch improves when its value beats the best so far by more than
  ``min_delta``; ties do not improve, so the best epoch is the *earliest* epoch
  with the best value.

  Attributes:
    monitor: a metrics.csv column, e.g. ``"val_loss"`` or ``"val_accuracy"``.
    mode: ``"min"`` or ``"max"``.
    patience: epochs without improvement before stopping (>= 1).
    min_delta: the smallest change that counts as an improvement (>= 0).
    restore_best: restore the best epoch's parameters when the run ends.
  """

  monitor: str = "val_loss"
  mode: str = "min"
  patience: int = 10
  min_delta: float = 0.0
  restore_best: bool = True

  def __post_init__(self):
    if self.mode not in ("min", "max"):
      raise ValueError(f"early stopping mode must be 'min' or 'max', got {self.mode!r}")
    if self.patience < 1:
      raise ValueError(f"early stopping patience must be >= 1, got {self.patience}")
    if not self.min_delta >= 0:
      raise ValueError(f"early stopping min_delta must be >= 0, got {self.min_delta}")

  @property
  def ranking(self) -> Ranking:
    """The rule's way of comparing epochs: its monitor, mode and ``min_delta``."""
    return Ranking(self.monitor, self.mode, self.min_delta)


@dataclasses.dataclass(frozen=True)
class Best:
  """The best epoch so far and the epochs since (checkpointed with the run)."""

  value: float = math.nan
  epoch: int = 0
  bad_epochs: int = 0

  def update(self, value: float, epoch: int, rule: EarlyStopping | Ranking | None,
             mode: str = "min", min_delta: float = 0.0) -> Best:
    """Returns the record after ``epoch`` scored ``value``.

    >>> rule = EarlyStopping(patience=2)
    >>> best = Best()
    >>> for epoch, loss in enumerate([3.0, 2.0, 2.0, 2.5], start=1):
    ...   best = best.update(loss, epoch, rule)
    >>> best
    Best(value=2.0, epoch=2, bad_epochs=2)
    >>> best.should_stop(rule)
    True
    """
    mode = rule.mode if rule else mode
    min_delta = rule.min_delta if rule else min_delta
    if math.isnan(value):
      return dataclasses.replace(self, bad_epochs=self.bad_epochs + 1)
    sign = 1.0 if mode == "min" else -1.0
    if math.isnan(self.value) or sign * (self.value - value) > min_delta:
      return Best(value=value, epoch=epoch, bad_epochs=0)
    return dataclasses.replace(self, bad_epochs=self.bad_epochs + 1)

  def step(self, steps_per_epoch: int) -> int | None:
    """The global step at the end of the best epoch (None before any)."""
    return self.epoch * steps_per_epoch if self.epoch else None

  def should_stop(self, rule: EarlyStopping | None) -> bool:
    """Whether ``rule`` stops the run now: ``patience`` epochs without a better one."""
    return rule is not None and self.bad_epochs >= rule.patience
