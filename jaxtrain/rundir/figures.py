"""A run's figures to its writers: the curves at the end of a session, and
figures an experiment draws after its run (:func:`log_images`)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtrain.engine import distributed
from jaxtrain.rundir import trackers
from jaxtrain.rundir.plots import read_epochs
from jaxtrain.rundir.writers import TensorBoardWriter, Writer, image_array

__all__ = ["last_step", "log_images", "write_images"]


def last_step(epochs: Mapping[str, Any]) -> int:
  """The last epoch's step of a history's epoch table (0: none).

  >>> last_step({"step": [25, 50, None]}), last_step({})
  (50, 0)
  """
  steps = [s for s in epochs.get("step") or () if s is not None]
  return int(steps[-1]) if steps else 0


def write_images(writers: Sequence[Writer], images: Mapping[str, Any], step: int) -> None:
  """Gives every writer each image (converted once, :func:`image_array`) at
  ``step``, then flushes it."""
  arrays = {name: image_array(image) for name, image in images.items()}
  for writer in writers:
    for name, array in arrays.items():
      writer.write_image(step, name, array)
    writer.flush()


def log_images(workdir: str | os.PathLike, images: Mapping[str, Any], *,
               step: int | None = None) -> None:
  """Logs figures made after a run to its TensorBoard and to the trackers it
  was run with (``trackers.json``), at ``step`` (default: the run's last).

  Args:
    workdir: the run directory (process 0's; other processes do nothing).
    images: name -> an array (``[h, w]`` or ``[h, w, 1|3|4]``, floats in [0, 1]
      or uint8), a PNG file's path or a matplotlib figure.
    step: the step the figures show; default: metrics.csv's last step.

  >>> import tempfile, numpy as np
  >>> workdir = pathlib.Path(tempfile.mkdtemp())
  >>> log_images(workdir, {"noise": np.random.default_rng(0).random((8, 8))}, step=3)
  >>> sorted(p.name.split(".")[0] for p in (workdir / "tensorboard").iterdir())
  ['events']
  """
  if not distributed.is_primary():
    return
  workdir = pathlib.Path(workdir)
  if step is None:
    step = last_step(read_epochs(workdir / "metrics.csv"))
  writers = [TensorBoardWriter(workdir / "tensorboard", start=None), *trackers.reopen(workdir)]
  try:
    write_images(writers, images, step)
  finally:
    for writer in writers:
      writer.close()
