"""Training curves: reading a run's history back and drawing ``curves.png``.

The figure is built with :class:`matplotlib.figure.Figure` directly, not
``pyplot``: that needs no display, selects no global backend (so it cannot
interfere with a notebook's or the user's own pyplot state) and leaks no
figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtrain.train.history import StepHistory

__all__ = ["plot_curves", "read_epochs", "read_history"]

# Linestyles distinguish runs (main run first); colours distinguish splits.
_STYLES = ("-", "--", ":", "-.")
_TRAIN, _VAL, _EMA = "C0", "C1", "C2"


def _points(table: Mapping[str, Any] | None, x_key: str, y_key: str):
  """The (x, y) points of a column, skipping missing (``None``) and non-finite
  values, so that e.g. a validation loss every few epochs is still a line.
  Without an x column (or with one of another length) x is 1, 2, ..."""
  table = table or {}
  ys = list(table.get(y_key) or [])
  xs = list(table.get(x_key) or [])
  if len(xs) != len(ys):
    xs = list(range(1, len(ys) + 1))
  pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
           if y is not None and x is not None and math.isfinite(float(y))]
  return [x for x, _ in pairs], [y for _, y in pairs]


def _autoscale(ax, values: Sequence[float]) -> None:
  # Losses spanning several decades (typical of per-iteration losses) are
  # unreadable on a linear axis; switch to log only when that is the case.
  if values and min(values) > 0 and max(values) / min(values) > 100:
    ax.set_yscale("log")


def plot_curves(history: Mapping[str, Any], path: str | os.PathLike, *,
                extra: Mapping[str, Mapping[str, Any]] | None = None,
                label: str | None = None) -> None:
  """Writes loss/accuracy curves of one or more runs to a PNG file.

  Panels: loss per epoch (train and validation), accuracy per epoch (only
  when some run has accuracies), the L1/L2 penalty per epoch (only when some
  run has ``train_penalty``) and the per-iteration training loss (only
  when some run has step records). Missing keys and ``None`` values are
  tolerated (skipped: the line joins the points that exist).

  Args:
    history: ``{"epoch": {"epoch": [...], "train_loss": [...], "val_loss":
      [...], "train_accuracy": [...], "val_accuracy": [...]}, "step":
      {"step": [...], "loss": [...]}}``, e.g. from
      :func:`read_history`.
    path: Output file (``.png``); parent directories are created.
    extra: More runs to overlay, by name (drawn dashed, dotted, ...), e.g.
      ``{"full batch": other_history}``.
    label: Legend name of the main run (default: none, plain "train").

  Example:
    >>> import os, tempfile
    >>> h = {"epoch": {"epoch": [1, 2], "train_loss": [0.9, 0.5],
    ...                "val_loss": [1.0, None]},
    ...      "step": {"step": [1, 2, 3, 4], "loss": [1.2, 0.8, 0.6, 0.4]}}
    >>> out = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plot_curves(h, out, extra={"full batch": h})
    >>> open(out, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
    True
  """
  from matplotlib.figure import Figure  # Lazy: matplotlib is slow to import.

  runs = [(label, h.get("epoch"), h.get("step"))
          for label, h in [(label, history), *(extra or {}).items()]]
  has_acc = any(_points(ep, "epoch", f"{split}_accuracy")[1]
                for _, ep, _ in runs for split in ("train", "val"))
  has_steps = any(_points(st, "step", "loss")[1] for _, _, st in runs)
  # Evaluations every N steps (eval_every_steps): the lessons' per-iteration
  # train and validation accuracy curves.
  has_step_acc = any(_points(st, "step", f"{split}_accuracy")[1]
                     for _, _, st in runs for split in ("train", "val"))
  # L1/L2 terms (Regularization): the lesson's "regularisation terms" curve.
  has_penalty = any(_points(ep, "epoch", "train_penalty")[1] for _, ep, _ in runs)
  n = 1 + has_acc + has_penalty + has_steps + has_step_acc
  width = 5.5 * n
  fig = Figure(figsize=(width, 4.2))
  # Fixed margins (inches), not layout="constrained": measuring every tick
  # label for the layout took half of the 0.3 s a figure costs.
  fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.12, top=0.92,
                      wspace=0.3)
  axes = list(fig.subplots(1, n, squeeze=False)[0])

  def finish(ax, title, xlabel, ylabel, seen):
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylabel == "loss":
      _autoscale(ax, seen)
    if seen:
      ax.legend()
    ax.grid(alpha=0.3)

  for metric in ("loss", "accuracy") if has_acc else ("loss",):
    ax, seen = axes.pop(0), []
    for i, (name, ep, _) in enumerate(runs):
      for split, color, what in (("train", _TRAIN, "train"),
                                 ("val", _VAL, "validation"),
                                 ("val_ema", _EMA, "validation, EMA of the parameters")):
        x, y = _points(ep, "epoch", f"{split}_{metric}")
        if y:
          ax.plot(x, y, _STYLES[i % len(_STYLES)], color=color,
                  marker="." if len(y) < 30 else None,
                  label=what + (f" ({name})" if name else ""))
          seen += y
    finish(ax, f"{metric.capitalize()} per epoch", "epoch", metric, seen)
  if has_penalty:
    ax, seen = axes.pop(0), []
    for i, (name, ep, _) in enumerate(runs):
      x, y = _points(ep, "epoch", "train_penalty")
      if y:
        ax.plot(x, y, _STYLES[i % len(_STYLES)], color=_TRAIN,
                marker="." if len(y) < 30 else None,
                label="train" + (f" ({name})" if name else ""))
        seen += y
    finish(ax, "L1/L2 penalty per epoch", "epoch", "penalty", seen)
  if has_steps:
    ax, seen = axes.pop(0), []
    for i, (name, _, st) in enumerate(runs):
      x, y = _points(st, "step", "loss")
      if y:
        ax.plot(x, y, _STYLES[i % len(_STYLES)], color=f"C{i}", linewidth=0.8,
                label="train" + (f" ({name})" if name else ""))
        seen += y
    finish(ax, "Training loss per iteration", "step", "loss", seen)
  if has_step_acc:
    ax, seen = axes.pop(0), []
    for i, (name, _, st) in enumerate(runs):
      for split, color, what in (("train", _TRAIN, "train"), ("val", _VAL, "validation")):
        x, y = _points(st, "step", f"{split}_accuracy")
        if y:
          ax.plot(x, y, _STYLES[i % len(_STYLES)], color=color, linewidth=0.8,
                  label=what + (f" ({name})" if name else ""))
          seen += y
    finish(ax, "Accuracy per iteration", "step", "accuracy", seen)

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def read_history(workdir: str | os.PathLike) -> dict[str, dict[str, list]]:
  """Reads ``metrics.csv`` and ``steps.jsonl`` back as a history dict.

  The result is what :func:`plot_curves` takes; it includes epochs done
  before a resume. Numbers come back as floats (ints where written as ints),
  empty cells as ``None``. Every epoch comes back; the steps as ``fit``'s
  history keeps them: every step up to 100,000, past that every ``k``-th
  step (``k`` a power of two: 50,000 to 100,000 rows) and the last
  (:class:`jaxtrain.train.history.StepHistory`), read in one pass without
  parsing the lines left out: memory stays bounded however long the run.

  Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "metrics.csv"), "w") as f:
    ...   _ = f.write("epoch,train_loss,val_loss\\n1,0.5,\\n")
    >>> with open(os.path.join(d, "steps.jsonl"), "w") as f:
    ...   _ = f.write('{"step": 1, "loss": 0.5}\\n')
    >>> read_history(d)
    {'epoch': {'epoch': [1], 'train_loss': [0.5], 'val_loss': [None]},
     'step': {'step': [1], 'loss': [0.5]}}
  """
  epoch = read_epochs(os.path.join(workdir, "metrics.csv"))
  step = StepHistory()
  path = os.path.join(workdir, "steps.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.endswith("\n"):  # A torn last line is left out.
          step.add(line, json.loads)
  return {"epoch": epoch, "step": step.table()}


def _number(cell: str) -> Any:
  if cell == "":
    return None
  try:
    return int(cell)
  except ValueError:
    try:
      return float(cell)
    except ValueError:
      return cell


def read_epochs(path: str | os.PathLike) -> dict[str, list]:
  """A ``metrics.csv`` as columns: name -> values, numbers as numbers, empty
  cells as ``None`` (a torn last line padded); ``{}`` for a missing file."""
  epoch: dict[str, list] = {}
  if os.path.exists(path):
    with open(path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader, [])
      epoch = {name: [] for name in header}
      for cells in reader:
        cells += [""] * (len(header) - len(cells))  # A torn last line.
        for name, cell in zip(header, cells, strict=False):
          epoch[name].append(_number(cell))
  return epoch
