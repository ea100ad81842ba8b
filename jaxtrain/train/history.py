"""The per-step history a run keeps in memory: bounded, evenly thinned.

``fit``'s ``FitResult.history["step"]`` and :func:`jaxtrain.rundir.plots.read_history`
keep every step of a run up to :data:`MAX_STEP_ROWS` steps. Past that, a
:class:`StepHistory` keeps every ``stride``-th step (the first step of the
history, then every 2nd, 4th, 8th, ...: the smallest power of two that keeps
at most :data:`MAX_STEP_ROWS` rows, so at least half that many), and always
the last step. ``steps.jsonl`` in a run directory keeps every step; the
history is for curves and summaries, and its memory does not grow with the
run (a row of a few metrics is ~100-150 bytes: ~15 MB at the bound).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

MAX_STEP_ROWS = 100_000  # rows a step history keeps, at most (and the last step)


class StepHistory:
  """Step rows, every ``stride``-th one kept once there are more than ``limit``.

  Rows come as columns (``extend``: a call's steps at once) or one at a time
  (``add``: a line of steps.jsonl, parsed only when kept). A column a row
  lacks gets None, as does a column first seen later for the rows before.

  >>> history = StepHistory(limit=4)
  >>> history.extend({"step": np.arange(1, 11), "loss": np.linspace(1.0, 0.1, 10)})
  >>> history.stride, history.table()["step"]
  (4, [1, 5, 9, 10])
  """

  def __init__(self, limit: int | None = None):
    limit = MAX_STEP_ROWS if limit is None else limit  # read now: a test may lower it
    if limit < 2:
      raise ValueError(f"a step history keeps at least 2 rows, got limit={limit}")
    self.limit, self.stride, self.count = limit, 1, 0
    self.columns: dict[str, list] = {}
    self._kept = 0
    self._last: tuple[Any, Callable | None] | None = None  # the last row, when not kept

  def extend(self, columns: Mapping[str, Any]) -> None:
    """Adds rows given as equal-length columns (numpy arrays or sequences)."""
    columns = {k: np.asarray(v).reshape(-1) for k, v in columns.items()}
    n = len(next(iter(columns.values()), ()))
    if not n:
      return
    first, self.count = self.count, self.count + n
    skip = -first % self.stride
    self._append({k: v[skip::self.stride].tolist() for k, v in columns.items()},
                 len(range(skip, n, self.stride)))
    if (self.count - 1) % self.stride:
      self._last = ({k: v[-1].item() for k, v in columns.items()}, None)
    else:
      self._last = None

  def add(self, row: Any, parse: Callable[[Any], Mapping[str, Any]] | None = None) -> None:
    """Adds one row: a mapping, or ``parse(row)`` is one (called only if kept)."""
    index, self.count = self.count, self.count + 1
    if index % self.stride:
      self._last = (row, parse)
      return
    self._last = None
    record = parse(row) if parse is not None else row
    self._append({k: [v] for k, v in record.items()}, 1)

  def table(self) -> dict[str, list]:
    """The kept rows as ``{column: [values]}`` (a copy), the last row included."""
    out = {k: list(v) for k, v in self.columns.items()}
    if self._last is not None:
      row, parse = self._last
      record = parse(row) if parse is not None else row
      for key in record:
        if key not in out:
          out[key] = [None] * self._kept
      for key, column in out.items():
        column.append(record.get(key))
    return out

  def _append(self, values: dict[str, list], n: int) -> None:
    for key, column in values.items():
      if key not in self.columns:  # (a setdefault would build the padding every time)
        self.columns[key] = [None] * self._kept
      self.columns[key].extend(column)
    self._kept += n
    for column in self.columns.values():
      if len(column) < self._kept:
        column.extend([None] * (self._kept - len(column)))
    while self._kept > self.limit:  # keep every other kept row: stride doubles
      self.stride *= 2
      for key, column in self.columns.items():
        self.columns[key] = column[::2]
      self._kept = len(next(iter(self.columns.values())))
