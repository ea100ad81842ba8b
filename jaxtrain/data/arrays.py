"""Dicts of equally long arrays: the checks every data path shares, and the one
masked row gather used on the host and on the device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


class DataError(ValueError):
  """Bad data or bad arguments; the one-line message names the file or argument."""


def check_length(arrays: Mapping[str, Any], where: str | None = None,
                 error: type[ValueError] = ValueError) -> int:
  """The shared leading-axis length of a non-empty dict of arrays.

  Raises ``error`` (prefixed with ``where``) for an empty or non-dict value or
  arrays of different lengths.

  >>> check_length({"inputs": np.zeros((3, 2)), "targets": np.zeros(3)})
  3
  """
  prefix = f"{where}: " if where else ""
  if not isinstance(arrays, Mapping) or not arrays:
    raise error(f"{prefix}arrays must be a non-empty dict of arrays, got {arrays!r:.80}")
  lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
  if None in lengths.values() or len(set(lengths.values())) != 1:
    raise error(f"{prefix}arrays must share their leading axis, got lengths {lengths}")
  return next(iter(lengths.values()))


def _take_host(values, idx):
  return np.asarray(values)[idx]


def gather_rows(arrays: Mapping[str, Any], idx, mask, *,
                take: Callable[[Any, Any], Any] = _take_host) -> dict[str, Any]:
  """Rows ``idx`` of every array, and their weights: ``mask`` times the rows' own
  ``"mask"`` entry when ``arrays`` has one.

  ``take(values, idx)`` selects rows: numpy indexing by default; the compiled
  programs pass a device gather.

  >>> rows = gather_rows({"x": np.arange(4), "mask": np.array([1, 1, 0, 1])},
  ...                    np.array([2, 3]), np.ones(2, np.float32))
  >>> rows["x"].tolist(), rows["mask"].tolist()
  ([2, 3], [0.0, 1.0])
  """
  batch = {k: take(v, idx) for k, v in arrays.items() if k != "mask"}
  if "mask" in arrays:
    # Gather, then cast: the rows' weights, not the whole (maybe huge) column.
    mask = mask * take(arrays["mask"], idx).astype(np.float32)
  return {**batch, "mask": mask}
