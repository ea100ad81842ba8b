"""The best epoch's parameters, kept on the device by the training programs.

A run that restores or checkpoints its best epoch needs that epoch's parameters
whatever the host's cadence: calls may span many epochs, and a checkpoint may
land mid-epoch. So the programs keep them in the carry: at every epoch end, the
monitored evaluation mean (e.g. ``val_loss``) is compared with the best so far
and, when it improves, the parameters and batch statistics are copied (one
``lax.cond`` per epoch, no host sync). The rule is the one
:class:`jaxtrain.train.stopping.Best` applies on the host to the same float32
means, so both name the same epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxtrain.core.metrics import means


@dataclasses.dataclass(frozen=True)
class BestRule:
  """Which evaluation mean ranks epochs (hashable: part of the programs' key).

  Attributes:
    split: the evaluated set (``"val"`` or ``"train"``).
    metric: its mean (``"loss"``, ``"accuracy"``, or a ``metrics_fn`` name).
    mode: ``"min"`` or ``"max"``.
    min_delta: the smallest change that counts as an improvement.
  """

  split: str
  metric: str
  mode: str = "min"
  min_delta: float = 0.0

  @classmethod
  def for_column(cls, column: str, evaluated, *, mode: str = "min",
                 min_delta: float = 0.0) -> BestRule | None:
    """The rule for a metrics.csv column such as ``"val_loss"``, or None when
    the column is not the mean of a set in ``evaluated`` (``train_loss_running``,
    ``learning_rate``): the host then keeps the best itself.

    >>> BestRule.for_column("val_accuracy", ("train", "val"), mode="max")
    BestRule(split='val', metric='accuracy', mode='max', min_delta=0.0)
    >>> BestRule.for_column("train_loss_running", ("train", "val")) is None
    True
    """
    split, _, metric = column.partition("_")
    if metric.startswith("ema_"):  # val_ema_loss: the moving average's evaluation
      split, metric = f"{split}_ema", metric[len("ema_"):]
    if split.removesuffix("_ema") not in evaluated or not metric or column in (
        "train_loss_running", "train_penalty"):
      return None
    return cls(split, metric, mode, float(min_delta))


def improves(rule: BestRule, value, best):
  """Whether ``value`` beats ``best`` (NaN never does; anything beats a NaN best)."""
  sign = 1.0 if rule.mode == "min" else -1.0
  return ~jnp.isnan(value) & (jnp.isnan(best) | (sign * (best - value) > rule.min_delta))


def update(rule: BestRule, best: dict, state, sums: Mapping[str, Mapping], ended) -> dict:
  """``best`` after an epoch whose evaluation ``sums`` are given; ``ended``
  (traced bool) says whether an epoch really ended (else nothing changes)."""
  value = jnp.asarray(means(sums[rule.split])[rule.metric], jnp.float32)
  keep = ended & improves(rule, value, best["value"])
  # Ranked by the moving average's evaluation, the best parameters are the average.
  ranked = state.with_ema_params() if rule.split.endswith("_ema") else state
  fresh = {"params": ranked.params, "batch_stats": state.batch_stats, "value": value}
  return jax.lax.cond(keep, lambda: fresh, lambda: best)


def variables(best: dict) -> dict:
  """The parameters and batch statistics of a record (what checkpoints hold)."""
  return {"params": best["params"], "batch_stats": best["batch_stats"]}
