"""A run directory around :func:`jaxtrain.fit`: config, logs, curves, no clobbering.

``run(...)`` is what experiments call: it refuses a directory that already holds
another run (unless ``overwrite``), writes ``config.json``, streams metrics to
``metrics.csv``, ``steps.jsonl`` and TensorBoard, and draws ``curves.png``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from jaxtrain.loop import COLUMNS, FitConfig, FitResult, fit
from jaxtrain.monitor import RunMonitor, write_config
from jaxtrain.plots import plot_curves, read_history
from jaxtrain.state import TrainState


class RunDirError(ValueError):
  """The run directory cannot be used as asked (it holds another run)."""


# What a run writes; --overwrite removes only these, never a user's other files.
RUN_FILES = ("config.json", "metrics.csv", "steps.jsonl", "curves.png", "tensorboard",
             "checkpoints")


def check_workdir(workdir: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Refuses a directory that holds a run, unless ``overwrite``; changes nothing."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise RunDirError(f"workdir {str(workdir)!r} exists and is not a directory")
  existing = [name for name in RUN_FILES if (workdir / name).exists()]
  if existing and not overwrite:
    raise RunDirError(
        f"workdir {str(workdir)!r} already holds a run ({', '.join(existing)}); "
        "choose another --workdir or pass --overwrite to replace it")
  return workdir


def clear_run(workdir: pathlib.Path) -> None:
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()


def run(state: TrainState, train: Mapping[str, Any], *, config: FitConfig,
        workdir: str | os.PathLike, record: Mapping[str, Any],
        val: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
        augment: Callable | None = None, overwrite: bool = False,
        extra_curves: Mapping[str, Any] | None = None) -> FitResult:
  """Trains into a run directory.

  Args:
    state, train, config, val, test, augment: as for :func:`jaxtrain.fit`.
    workdir: the run directory (created).
    record: the experiment's resolved config, written to ``config.json``.
    overwrite: replace a run already in ``workdir``.
    extra_curves: other runs' histories to overlay on ``curves.png``.

  Returns:
    The :class:`~jaxtrain.FitResult`.
  """
  workdir = check_workdir(workdir, overwrite=overwrite)
  workdir.mkdir(parents=True, exist_ok=True)
  clear_run(workdir)
  write_config(workdir, dict(record))
  n_train = len(train["targets"])
  steps_per_epoch = (n_train // config.batch_size if config.drop_remainder
                     else -(-n_train // config.batch_size))
  with RunMonitor(workdir, columns=COLUMNS, total_steps=config.epochs * steps_per_epoch,
                  steps_per_epoch=steps_per_epoch, histogram_every=config.histogram_every,
                  progress=config.progress) as monitor:
    result = fit(state, train, config=config, val=val, test=test, augment=augment,
                 monitor=monitor, log=monitor.write)
  plot_curves(read_history(workdir), workdir / "curves.png", extra=extra_curves)
  return result
