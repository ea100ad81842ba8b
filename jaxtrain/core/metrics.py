"""Metrics as sums and counts, and the one rule that turns them into means.

Evaluations return sums (``loss_sum``, ``correct``) and the total weight
``count`` of the examples they cover, so that any number of ragged, padded or
per-device batches add up exactly; :func:`means` divides once at the end. The
same function serves traced arrays inside compiled programs, numpy arrays
fetched from the device and Python floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mean_name(key: str) -> str | None:
  """The mean a sum gives over ``count``: ``correct`` -> ``accuracy``,
  ``<name>_sum`` -> ``<name>``; None for ``count`` and for keys that are not sums.

  >>> mean_name("loss_sum"), mean_name("correct"), mean_name("top2_sum"), mean_name("loss")
  ('loss', 'accuracy', 'top2', None)
  """
  if key == "correct":
    return "accuracy"
  return key[: -len("_sum")] if key.endswith("_sum") and len(key) > 4 else None


def is_sum(key: str) -> bool:
  """Whether ``key`` of an evaluation result is a sum (adds up over batches)."""
  return key == "count" or mean_name(key) is not None


def _xp(*values):
  return jnp if any(isinstance(v, jax.Array) for v in values) else np


def safe_divide(total, count):
  """``total / count``, and 0 where ``count`` is 0 (exact where it is not)."""
  xp = _xp(total, count)
  return xp.where(count > 0, total / xp.where(count > 0, count, 1.0), 0.0)


def weighted_sum(values, weights):
  """``sum(values * weights)`` over the rows with weight > 0."""
  # where, not a product: a padding row's value may be inf or nan (garbage
  # rows, out-of-range labels) and 0 * nan is nan.
  return jnp.sum(jnp.where(weights > 0, values * weights, 0.0))


def means(sums: Mapping[str, Any]) -> dict[str, Any]:
  """The means of evaluation sums: ``loss``, ``accuracy`` for class labels, and
  ``<name>`` for every other ``<name>_sum``.

  >>> {k: float(v) for k, v in means({"loss_sum": 3.0, "count": 2.0, "correct": 1.0}).items()}
  {'loss': 1.5, 'accuracy': 0.5}
  """
  # loss and accuracy first, whatever the order of the sums (device_get sorts
  # dict keys), so rows and logs list them the same way every time.
  keys = sorted((k for k in sums if mean_name(k) is not None),
                key=lambda k: (k != "loss_sum", k != "correct"))
  return {mean_name(key): safe_divide(sums[key], sums["count"]) for key in keys}


def summarize(batch_metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Aggregates a sequence of :func:`jaxtrain.eval_step` results exactly.

  The epoch loss is the total weighted loss over the total weight, not a mean of
  batch means, so a padded last batch counts for what it holds. Every sum is
  kept (``count``, ``correct`` and any ``<name>_sum``, e.g. of your own
  metric) with its mean; per-batch means are dropped.

  >>> summarize([{"loss_sum": 3.0, "count": 2.0, "loss": 1.5},
  ...            {"loss_sum": 1.0, "count": 1.0, "loss": 1.0}])
  {'loss_sum': 4.0, 'count': 3.0, 'loss': 1.3333333333333333}
  """
  batch_metrics = list(batch_metrics)
  if not batch_metrics:
    raise ValueError("cannot summarize an empty sequence of batch metrics")
  keys = [k for k in batch_metrics[0] if is_sum(k)]
  if "count" not in keys:
    raise ValueError("batch metrics need a 'count' (from eval_step), got "
                     f"{sorted(batch_metrics[0])}")
  sums = {k: sum(float(m[k]) for m in batch_metrics) for k in keys}
  if sums["count"] <= 0:
    raise ValueError(f"cannot summarize batches of total weight {sums['count']}")
  return {**sums, **{k: float(v) for k, v in means(sums).items()}}
