"""What a training run writes to its run directory and to the terminal.

``fit`` never syncs the host per step: it hands a chunk of per-step metrics
(e.g. one epoch, fetched at once) to :meth:`RunMonitor.log_steps` and a row per
epoch to :meth:`RunMonitor.log_epoch`. Files are buffered, flushed per epoch:
``metrics.csv`` (a row per epoch, floats as ``repr``: byte-identical reruns),
``steps.jsonl`` (a JSON object per step) and ``tensorboard/`` (tensorboardX event
files, no TensorFlow). ``config.json`` is :mod:`jaxtrain.rundir.record`'s and
``curves.png`` :mod:`jaxtrain.rundir.plots`'. The bar and the epoch lines are
:class:`~jaxtrain.train.progress.Progress`'s, as ``fit`` shows them without a
run directory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.rundir.plots import plot_curves, read_epochs, read_history
from jaxtrain.rundir.record import write_config
from jaxtrain.rundir.writers import (
  TensorBoardWriter,
  Tracker,
  Writer,
  epoch_scalars,
  image_array,
)
from jaxtrain.train.ledger import StepLog
from jaxtrain.train.logstore import LogWriter, read_back
from jaxtrain.train.progress import Progress

# plot_curves, read_history and write_config are re-exported: they were
# monitor's before plots.py and record.py took them over.
__all__ = ["RunMonitor", "plot_curves", "read_history", "write_config"]


def _py(value: Any) -> Any:
  """A Python scalar for a numpy/JAX scalar (``repr(np.float32(1))`` is not
  ``'1.0'``), so files do not depend on where a number came from."""
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  array = np.asarray(value)
  if array.ndim:
    raise ValueError(f"expected a scalar, got shape {array.shape}")
  return array.item() if array.dtype.kind in "iub" else float(array)


def _column(values: Any, n: int, name: str) -> list:
  array = np.asarray(values).reshape(-1)
  if array.shape[0] != n:
    raise ValueError(f"metric {name!r} has {array.shape[0]} values for {n} steps")
  # float64 first: bfloat16/float16 .tolist() does not give Python floats.
  return (array if array.dtype.kind in "iub" else array.astype(np.float64)).tolist()


def _finite(value: Any) -> Any:
  """``value``, or None for a non-finite float (JSON has no NaN)."""
  return None if isinstance(value, float) and not math.isfinite(value) else value


def _first_lines(path: str, n: int):
  """The SHA-256 (a ``hashlib`` object) of the first ``n`` complete lines of
  ``path``, their count and their bytes."""
  hasher, lines, offset = hashlib.sha256(), 0, 0
  try:
    with open(path, "rb") as f:
      while lines < n and (line := f.readline()).endswith(b"\n"):
        hasher.update(line)
        lines, offset = lines + 1, offset + len(line)
  except FileNotFoundError:
    pass
  return hasher, lines, offset


def _truncate_lines(path: str, n: int, what: str = "step records"):
  """Keeps the first ``n`` complete lines of ``path`` (a torn last line goes);
  returns their SHA-256."""
  hasher, lines, offset = _first_lines(path, n)
  with open(path, "a+b") as f:  # Creates a missing file.
    f.truncate(offset)
  if lines < n:
    warnings.warn(f"{path} has {lines} {what}, expected {n}; the resumed "
                  "run will not be byte-identical to an uninterrupted one",
                  stacklevel=3)
  return hasher


def _records(path: str):
  """steps.jsonl's objects, one at a time (``None`` for ``null``: not finite)."""
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        yield json.loads(line)


def _csv_rows(path: str) -> list[dict]:
  """metrics.csv's rows with numbers as numbers (empty cells: ``None``)."""
  table = read_epochs(path)
  return [dict(zip(table, values, strict=True)) for values in zip(*table.values())]


class RunMonitor(Progress):
  """Writes metrics and TensorBoard events for one training run, and shows its
  progress as :class:`~jaxtrain.train.progress.Progress` does.

  Args:
    workdir: Run directory (created).
    columns: ``metrics.csv`` columns in order.
    total_steps: Steps of the whole run (progress bar, ETA).
    steps_per_epoch: Steps per epoch (for "epoch 3/100").
    progress: ``True``: tqdm bar (the epoch lines above it); ``False``: one
      plain line per epoch; ``None``: a bar when stderr is a terminal.
    resume_rows: Epoch rows already done (from a checkpoint): ``metrics.csv``
      is rewritten with exactly these rows; or N (keep its first N rows: a
      checkpoint whose rows did not read back). Empty for a fresh run.
    resume_step_records: ``steps.jsonl`` as a resumed checkpoint counts it: a
      :class:`~jaxtrain.train.ledger.StepLog` (its lines' digest: the file is
      kept when its first lines match, else rewritten from the checkpoints' log
      segments, whatever became of it), or N (keep its first N lines);
      ``None``: start it afresh.
    quiet: Print nothing (the files only).
    lines: Print a line per epoch (``False`` with ``progress=False``: no
      progress at all, as ``FitConfig(progress=False)``; messages still print).
    writers: more :class:`~jaxtrain.rundir.writers.Writer` s beside TensorBoard
      (trackers, your own), given every output in step order; the monitor
      flushes them at checkpoints and leaves closing them to you. A
      :class:`~jaxtrain.rundir.writers.Tracker` behind the resumed step is sent
      the run's record first (:meth:`~jaxtrain.rundir.writers.Tracker.catch_up`).
    tensorboard: the TensorBoard writer to use (yours to close, e.g. to log
      figures after the run into the same event file); default: its own, made
      with ``start=``:meth:`resumed_step`, closed with the monitor.

  Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> with RunMonitor(tmp.name, columns=["epoch", "step", "train_loss"],
    ...                 total_steps=2, steps_per_epoch=2, progress=False) as mon:
    ...   mon.log_steps(np.array([1, 2]), {"loss": np.array([0.75, 0.25])})
    ...   mon.log_epoch({"epoch": 1, "step": 2, "train_loss": 0.5})
    epoch 1/1  train_loss 0.5
    >>> print(open(os.path.join(tmp.name, "metrics.csv")).read())
    epoch,step,train_loss
    1,2,0.5
    >>> tmp.cleanup()
  """

  def __init__(self, workdir: str | os.PathLike, *, columns: Sequence[str],
               total_steps: int, steps_per_epoch: int,
               progress: bool | None = None, resume_rows: Sequence[dict] | int = (),
               resume_step_records: StepLog | int | None = None, quiet: bool = False,
               lines: bool = True, writers: Sequence[Writer] = (),
               tensorboard: TensorBoardWriter | None = None):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.columns, self._closed = list(columns), False

    # Steps done before this session: the bar and the ETA start from here.
    start = self.resumed_step(resume_rows, resume_step_records)
    rows = resume_rows if not isinstance(resume_rows, int) else ()

    # Rewriting metrics.csv from the checkpoint's rows (rather than appending)
    # drops rows logged after that checkpoint, keeping resumes byte-identical.
    csv_path = os.path.join(self.workdir, "metrics.csv")
    if isinstance(resume_rows, int):  # rows that did not read back: the file's header and rows
      _truncate_lines(csv_path, 1 + resume_rows, "lines")
    self._csv_file = open(csv_path, "a" if isinstance(resume_rows, int) else "w",
                          newline="", buffering=1 << 16)
    self._csv = csv.writer(self._csv_file, lineterminator="\n")
    if not isinstance(resume_rows, int):
      self._csv.writerow(self.columns)
    for row in rows:
      self._write_row(row)
    self._csv_file.flush()

    steps_path = os.path.join(self.workdir, "steps.jsonl")
    # The lines as checkpoints count them (step_log()): a count and a digest.
    self._steps_log = self._resume_steps(steps_path, resume_step_records)
    self._steps_file = open(steps_path, "w" if resume_step_records is None
                            else "a", buffering=1 << 16)

    # TensorBoard first, then the writers given (trackers, your own).
    self._pending: list[tuple[list[int], dict[str, list]]] = []
    self._own_tensorboard = tensorboard is None
    self.writers: list[Writer] = [
        tensorboard or TensorBoardWriter(os.path.join(self.workdir, "tensorboard"), start=start),
        *writers]
    for writer in self.writers:
      if isinstance(writer, Tracker) and writer.behind(start):
        writer.catch_up(_records(steps_path), rows or _csv_rows(csv_path))
    # Last: the bar and the rate clock start once the files are open.
    super().__init__(columns, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     bar=progress, lines=lines, start=start, quiet=quiet)

  @staticmethod
  def resumed_step(resume_rows: Sequence[dict] | int = (),
                   resume_step_records: StepLog | int | None = None) -> int:
    """The step a monitor of these ``resume_*`` arguments starts after (0: a fresh run)."""
    start = int(resume_step_records or 0)
    rows = resume_rows if not isinstance(resume_rows, int) else ()
    if rows and rows[-1].get("step") is not None:
      start = int(_py(rows[-1]["step"]))
    return start

  def log_steps(self, steps: np.ndarray, metrics: Mapping[str, np.ndarray]) -> None:
    """Logs a chunk of steps: ``steps.jsonl``, ``train/step_<name>`` scalars.

    Args:
      steps: Step numbers, shape ``[n]`` (numpy, already on the host).
      metrics: Name -> per-step values, each of shape ``[n]``. Floats are
        written in full (``repr``); NaN and infinities as ``null`` (strict
        JSON: every parser reads the lines).
    """
    self._check_open()
    steps = np.asarray(steps).reshape(-1).tolist()
    if not steps:
      return
    columns = {k: _column(v, len(steps), k) for k, v in metrics.items()}
    lines = [json.dumps({"step": int(step), **{k: _finite(v[i]) for k, v in columns.items()}},
                        allow_nan=False) + "\n" for i, step in enumerate(steps)]
    # The writers get them in step order with the rest (an epoch's scalars at
    # its last step come after that step, before the next epoch's steps).
    self._pending.append((steps, {f"train/step_{k}": v for k, v in columns.items()}))
    self._steps_file.writelines(lines)
    self._steps_log.add(lines)
    super().log_steps(steps, columns)

  @staticmethod
  def _resume_steps(path: str, records: StepLog | int | None) -> LogWriter:
    """Makes ``path`` hold exactly the resumed run's step records: the file's
    first lines when they match the checkpoint's digest, else the lines read
    back from the checkpoints' log segments (or an older checkpoint's chunks)."""
    if records is None:
      return LogWriter("steps")
    n = int(records)
    if isinstance(records, StepLog) and records.sha256 is not None:
      hasher, lines, offset = _first_lines(path, n)
      if lines == n and hasher.hexdigest() == records.sha256:
        with open(path, "r+b") as f:
          f.truncate(offset)
        return LogWriter("steps", n, hasher)
      found = read_back(pathlib.Path(records.folder), "steps",
                        {"records": n, "sha256": records.sha256})
      if found is not None:
        with open(path + ".tmp", "w") as f:
          f.writelines(found[1]())
        os.replace(path + ".tmp", path)
        return LogWriter("steps", n, found[0])
    elif isinstance(records, StepLog) and records.chunks:
      text = records.text()
      if text.count("\n") == n:  # else: an older writer's log; keep the file's
        with open(path, "w") as f:
          f.write(text)
        return LogWriter("steps", n, hashlib.sha256(text.encode()))
    return LogWriter("steps", n, _truncate_lines(path, n))

  def step_log(self, folder: str | os.PathLike) -> dict:
    """What a checkpoint records of ``steps.jsonl``: its line count and their
    SHA-256; the lines no segment in ``folder`` holds yet are written there
    first (:mod:`jaxtrain.train.logstore`)."""
    self._steps_file.flush()

    def after(n: int):
      with open(self._steps_file.name) as f:
        for i, line in enumerate(f):
          if i >= n:
            yield line

    return self._steps_log.save(folder, after)

  def log_epoch(self, row: Mapping[str, Any]) -> None:
    """Logs an epoch row: ``metrics.csv``, ``epoch/<name>`` scalars, a line.

    Keys not in ``columns`` go to TensorBoard only; missing or ``None`` values
    give empty cells. TensorBoard's x axis is ``row["step"]`` when present
    (so epoch curves line up with per-step ones), else the epoch.
    """
    self._check_open()
    row = {k: _py(v) for k, v in row.items()}
    self._write_row(row)
    step, scalars = epoch_scalars(row)
    self._release(step)
    for writer in self.writers:
      writer.write_scalars(step, scalars)
    # The files and TensorBoard show each epoch as it ends; the other writers
    # (trackers: a transaction each) batch until a checkpoint or their own pace.
    self._csv_file.flush()
    self._steps_file.flush()
    self.writers[0].flush()
    super().log_epoch(row)

  def flush(self) -> None:
    """Writes everything logged so far to disk (before a checkpoint counts it)."""
    self._check_open()
    self._release(None)
    self._flush_all()

  def _flush_all(self) -> None:
    self._csv_file.flush()
    self._steps_file.flush()
    for writer in self.writers:
      writer.flush()

  def _release(self, through: int | None) -> None:
    """Gives the writers the logged steps up to ``through`` (``None``: all)."""
    keep = []
    for steps, tagged in self._pending:
      n = len(steps) if through is None else int(np.searchsorted(steps, through, "right"))
      if n:
        for writer in self.writers:
          writer.write_steps(steps[:n], {k: v[:n] for k, v in tagged.items()})
      if n < len(steps):
        keep.append((steps[n:], {k: v[n:] for k, v in tagged.items()}))
    self._pending = keep

  def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs a callback's scalars at ``step`` as ``callback/<name>`` (a resumed
    run's redone steps replace them, as every event's)."""
    self._check_open()
    tagged = {f"callback/{name}": float(value) for name, value in scalars.items()}
    self._release(int(step))
    for writer in self.writers:
      writer.write_scalars(int(step), tagged)

  def log_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs images at ``step`` to every writer: name -> an array, a PNG's path
    or a matplotlib figure (:func:`~jaxtrain.rundir.writers.image_array`)."""
    self._check_open()
    self._release(int(step))
    for name, image in images.items():
      array = image_array(image)
      for writer in self.writers:
        writer.write_image(int(step), str(name), array)

  def log_histograms(self, step: int, params: Any, grads: Any = None,
                     activations: Any = None) -> None:
    """Logs ``weights/<path>`` (and ``grads/<path>``, ``activations/<path>``)
    histograms.

    Paths join pytree keys with "/", e.g. ``Dense_0/kernel``. Non-finite
    values are left out (a leaf with none left is skipped).
    """
    self._check_open()
    import jax  # Lazy: the rest of this module does not need JAX.

    histograms = {}
    for prefix, tree in (("weights", params), ("grads", grads), ("activations", activations)):
      if tree is None:
        continue
      leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
      for path, leaf in leaves:
        values = np.asarray(leaf, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if values.size:
          histograms[f"{prefix}/{name}"] = values
    self._release(int(step))
    for writer in self.writers:
      writer.write_histograms(int(step), histograms)

  def close(self) -> None:
    """Flushes and closes everything; safe to call twice."""
    if not self._closed:
      self._release(None)
      self._closed = True
      super().close()
      for closable in (self._csv_file, self._steps_file):
        closable.close()
      for i, writer in enumerate(self.writers):
        writer.close() if i == 0 and self._own_tensorboard else writer.flush()

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError("RunMonitor is closed")

  def _write_row(self, row: Mapping[str, Any]) -> None:
    values = [_py(row.get(name)) for name in self.columns]
    self._csv.writerow(["" if v is None else repr(v) if isinstance(v, float)
                        else str(v) for v in values])
