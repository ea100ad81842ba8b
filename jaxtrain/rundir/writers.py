"""Where a run's outputs go: the :class:`Writer` interface and TensorBoard's writer.

A run directory's monitor (:class:`~jaxtrain.monitor.RunMonitor`) keeps the run's
own record (``metrics.csv``, ``steps.jsonl``: what a resume restores byte for
byte) and hands every output to its writers: TensorBoard always, and the
experiment trackers asked for (:mod:`jaxtrain.rundir.trackers`: MLflow, Weights &
Biases, Trackio), or your own :class:`Writer`. Names are the same everywhere:

- ``train/step_<metric>`` per step (``train/step_loss``), at that step;
- ``epoch/<column>`` per epoch (``epoch/val_accuracy``), at the epoch's last step;
- ``callback/<name>`` a callback's scalars, at its step;
- ``weights/<path>``, ``grads/<path>``, ``activations/<path>`` histograms;
- images by name (``curves``, or a callback's), at the step they show.

Steps are updates done (step k: the state after k updates). A writer must accept
a step it has been given before after a resume (the steps after the checkpoint are
done again, to the same values): TensorBoard hides the older events past the
checkpoint; a tracker, whose store only appends, logs each name at a step only
once (:class:`Tracker`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["TensorBoardWriter", "Tracker", "Writer", "epoch_scalars", "image_array"]


class Writer:
  """One destination of a run's outputs; every method is optional (a no-op here).

  Subclass it and pass instances to :func:`jaxtrain.run.run` (``writers=``) or
  :class:`~jaxtrain.monitor.RunMonitor`:

  >>> class Printer(Writer):
  ...   def write_scalars(self, step, scalars):
  ...     print(step, dict(scalars))
  >>> Printer().write_scalars(25, {"epoch/val_loss": 0.5})
  25 {'epoch/val_loss': 0.5}
  """

  def write_config(self, config: Mapping[str, Any]) -> None:
    """The run's config (``config.json``'s record), at the start of each session
    (trackers get it when they open)."""

  def write_steps(self, steps: Sequence[int], columns: Mapping[str, Sequence[Any]]) -> None:
    """Per-step scalars: ``columns[name][i]`` at ``steps[i]`` (names as
    ``train/step_loss``; a value may be ``None``: not finite)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Named scalars at ``step`` (``epoch/...``, ``callback/...``)."""

  def write_histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
    """Histograms at ``step``: name -> the finite values (1-D float64)."""

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """An image at ``step``: ``[height, width, 3]`` uint8 RGB."""

  def flush(self) -> None:
    """Hands on everything written so far (before a checkpoint counts it). A
    tracker may still be writing it in the background: what a killed process
    lost is sent again when the run resumes (:meth:`Tracker.catch_up`)."""

  def close(self) -> None:
    """Flushes and releases the destination; called once."""


def epoch_scalars(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
  """An epoch row as ``(step, {"epoch/<column>": value})``: its numeric
  columns but ``epoch`` and ``step``, at the row's step (else its epoch).

  >>> epoch_scalars({"epoch": 2, "step": 50, "train_loss": 0.25, "val_loss": None})
  (50, {'epoch/train_loss': 0.25})
  """
  x = row.get("step") if row.get("step") is not None else row.get("epoch")
  return int(x), {f"epoch/{name}": float(value) for name, value in row.items()
                  if name not in ("epoch", "step") and isinstance(value, (int, float))
                  and not isinstance(value, bool)}


def image_array(image: Any) -> np.ndarray:
  """An image as ``[height, width, 3]`` uint8: from an array (float in [0, 1]
  or uint8; gray, RGB or RGBA), a PNG file's path, or a matplotlib figure.

  >>> image_array(np.ones((2, 3))).shape
  (2, 3, 3)
  """
  if isinstance(image, (str, os.PathLike)):
    from matplotlib import image as mpimg  # Lazy: matplotlib is slow to import.

    image = mpimg.imread(os.fspath(image))
  elif hasattr(image, "canvas") and hasattr(image, "savefig"):  # a matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(image)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"an image must be [height, width] or [height, width, 1|3|4], "
                     f"got shape {array.shape}")
  if array.dtype.kind == "f":
    array = np.round(np.clip(array, 0.0, 1.0) * 255)
  array = array.astype(np.uint8)
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])


class TensorBoardWriter(Writer):
  """``<workdir>/tensorboard`` event files (tensorboardX, no TensorFlow).

  Args:
    logdir: the event files' folder.
    start: the step the run resumes after (0: a fresh run). TensorBoard hides
      events at steps >= ``start + 1`` from older event files in the folder:
      the steps a resume redoes, or all of a previous run's on a fresh start.
      ``None``: hide nothing (a writer adding to a finished run, its figures).
  """

  def __init__(self, logdir: str | os.PathLike, *, start: int | None = 0):
    from tensorboardX import SummaryWriter  # Lazy: imports protobuf.

    # A large queue: the default (10) blocks the loop on a per-epoch burst.
    # The suffix (sub-second time) keeps two writers started in the same
    # second from sharing a file name, and sorts them in start order.
    purge = None if start is None else start + 1 if start else 0
    self._tb = SummaryWriter(os.fspath(logdir), purge_step=purge,
                             max_queue=1024, flush_secs=10,
                             filename_suffix=f".{time.time_ns() % 10**9:09d}")

  def write_steps(self, steps, columns):
    """One TensorBoard event per step, all its scalars in it."""
    from tensorboardX.proto.summary_pb2 import Summary

    writer = self._tb.file_writer  # One event per step, not one per scalar.
    for i, step in enumerate(steps):
      writer.add_summary(Summary(value=[
          Summary.Value(tag=name, simple_value=values[i])
          for name, values in columns.items()]), int(step))

  def write_scalars(self, step, scalars):
    """A scalar event per name."""
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))

  def write_histograms(self, step, values):
    """A histogram per name."""
    for name, array in values.items():
      self._tb.add_histogram(name, array, int(step))
    self._tb.flush()

  def write_image(self, step, name, image):
    """An image summary (HWC)."""
    self._tb.add_image(name, image, int(step), dataformats="HWC")

  def flush(self):
    """Writes the queued events."""
    self._tb.flush()

  def close(self):
    """Flushes and closes the event file."""
    self._tb.close()


class Tracker(Writer):
  """A writer to a store that only appends (an experiment tracker): it logs
  each name at each step once, across the sessions of a resumed run.

  On opening, a subclass reads from its store the last step logged for each
  name (:meth:`logged`); afterwards a value at a step at or below that is not
  sent again (a resumed run redoes the steps after its checkpoint, to the same
  values). :meth:`catch_up` sends the steps the store lacks before the
  checkpoint (a process killed before its tracker wrote them) from the run's
  own record. Subclasses implement :meth:`send` (and may override images).
  """

  name = "tracker"

  def __init__(self):
    self._last: dict[str, int] = {}

  def logged(self) -> dict[str, int]:
    """Name -> the last step the store holds for it (read on opening)."""
    return dict(self._last)

  def behind(self, step: int) -> bool:
    """Whether the store may lack a step or epoch at or before ``step``."""
    kept = [last for name, last in self._last.items()
            if name.startswith(("train/step_", "epoch/"))]
    return min(kept, default=-1) < step

  def send(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs ``scalars`` at ``step`` (finite floats, names not yet logged there)."""
    raise NotImplementedError

  def _new(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    fresh = {}
    for name, value in scalars.items():
      if value is None or step <= self._last.get(name, -1):
        continue
      value = float(value)
      if np.isfinite(value):
        fresh[name] = value
      self._last[name] = step
    return fresh

  def write_steps(self, steps, columns):
    """Sends each step's scalars not yet logged."""
    for i, step in enumerate(steps):
      fresh = self._new(int(step), {name: values[i] for name, values in columns.items()})
      if fresh:
        self.send(int(step), fresh)

  def write_scalars(self, step, scalars):
    """Sends the scalars not yet logged at ``step``."""
    fresh = self._new(int(step), scalars)
    if fresh:
      self.send(int(step), fresh)

  def catch_up(self, records: Iterable[Mapping[str, Any]],
               rows: Iterable[Mapping[str, Any]]) -> None:
    """Sends what the store lacks of the run so far: ``records`` (steps.jsonl's
    objects) as ``train/step_<metric>``, ``rows`` (metrics.csv's) as epochs.
    Called on opening a resumed run, before its new steps."""
    rows_at: dict[int, list[dict]] = {}
    for step, scalars in map(epoch_scalars, rows):
      rows_at.setdefault(step, []).append(scalars)
    for record in records:
      step = int(record["step"])
      for due in sorted(s for s in rows_at if s < step):
        for scalars in rows_at.pop(due):
          self.write_scalars(due, scalars)
      self.write_steps([step], {f"train/step_{k}": [v] for k, v in record.items()
                                if k != "step"})
      for scalars in rows_at.pop(step, ()):
        self.write_scalars(step, scalars)
    for due in sorted(rows_at):
      for scalars in rows_at.pop(due):
        self.write_scalars(due, scalars)
