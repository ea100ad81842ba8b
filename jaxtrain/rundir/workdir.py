"""A run directory before its run writes: is it this run, another, or none;
its lock; clearing it.

:func:`check_workdir` decides how ``jaxtrain.run.run`` uses a directory
(resume, start afresh, or refuse) and changes nothing; :func:`lock_run_dir`
takes the OS lock the writing run holds for its life; :func:`clear_run`
removes what a run writes (and nothing else) when a different run is
replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

from jaxtrain.rundir.checkpointer import DIRECTORY
from jaxtrain.rundir.record import checkpoint_record, differences, jsonable, read_config
from jaxtrain.train.config import FitConfig


class RunDirError(ValueError):
  """The run directory cannot be used as asked (it holds another run)."""


# What a run writes; overwrite removes only these, never a user's other files.
RUN_FILES = ("config.json", "metrics.csv", "steps.jsonl", "curves.png", "tensorboard",
             DIRECTORY, f"{DIRECTORY}_damaged", "trackers.json", "wandb")


def check_workdir(workdir: str | os.PathLike, record: Mapping[str, Any] | None = None, *,
                  overwrite: bool = False) -> bool:
  """Decides how to use ``workdir``; changes nothing.

  Returns:
    True to resume the run found there, False to start afresh.

  Raises:
    RunDirError: it holds a different run (or one of unknown config) and
      ``overwrite`` is off, or it is not a directory.
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise RunDirError(f"workdir {str(workdir)!r} exists and is not a directory")
  hint = "choose another --workdir or pass --overwrite to replace it"
  if not overwrite and (workdir / "sweep.json").exists():  # experiments' --sweep
    raise RunDirError(f"workdir {str(workdir)!r} holds a sweep (sweep.json); {hint}")
  existing = [name for name in RUN_FILES if (workdir / name).exists()]
  if not existing or overwrite:
    return False
  config_path = workdir / "config.json"
  saved, problem = read_config(config_path)
  if problem is not None and _has_checkpoints(workdir):
    return _without_config(workdir, record, problem)
  if record is None or problem == "missing":
    raise RunDirError(f"workdir {str(workdir)!r} already holds a run "
                      f"({', '.join(existing)}); {hint}")
  if problem is not None:
    raise RunDirError(f"{str(config_path)!r} is {problem}; {hint}")
  if found := differences(saved, record, _added_defaults()):
    shown = "; ".join(found[:3]) + ("; ..." if len(found) > 3 else "")
    raise RunDirError(f"workdir {str(workdir)!r} holds a run with a different config "
                      f"({shown}); {hint}")
  return (workdir / DIRECTORY).is_dir()


def _added_defaults() -> dict[str, Any]:
  """A FitConfig field added since a run was written, at its default, is the
  behaviour the run had: not a difference."""
  return {f"fit.{f.name}": jsonable(f.default) for f in dataclasses.fields(FitConfig)
          if f.default is not dataclasses.MISSING}


def _has_checkpoints(workdir: pathlib.Path) -> bool:
  with contextlib.suppress(OSError):
    return any(p.name.isdigit() for p in (workdir / DIRECTORY).iterdir())
  return False


def _without_config(workdir: pathlib.Path, record: Mapping[str, Any] | None,
                    problem: str) -> bool:
  """A run whose config.json is missing or damaged but whose checkpoints are
  there: resumed (config.json rewritten) when its latest checkpoint records
  this very run, else refused without a remedy that deletes them."""
  path = str(workdir / "config.json")
  saved, step = checkpoint_record(workdir) if record is not None else (None, None)
  if saved is not None and not differences(saved, record, _added_defaults()):
    warnings.warn(f"{path!r} is {problem}: checkpoint {step} records the same run; "
                  "resuming it and writing config.json again", stacklevel=3)
    return True
  why = ("its checkpoints record a different run" if saved is not None
         else "its checkpoints do not record the run's config" if record is not None
         else "this call names no run to compare")
  raise RunDirError(f"{path!r} is {problem} and {why}: restore config.json from a copy, "
                    "or move the run directory aside to keep its checkpoints")


LOCK = ".lock"  # held (flock) by the run writing the directory, with its pid inside


class RunDirLock:
  """An OS lock on a run directory for the life of the run writing it.

  ``flock`` on ``<workdir>/.lock``: the kernel releases it when the process
  ends however it ends (a SIGKILL leaves no stale lock), so only a live run
  holds it. The holder's pid is written inside for the refusal's message and
  removed on release.
  """

  def __init__(self, workdir: pathlib.Path):
    import fcntl

    self.path = pathlib.Path(workdir) / LOCK
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
      os.close(self._fd)
      raise RunDirError(f"workdir {str(workdir)!r} is in use by another run "
                        f"(pid {holder or 'unknown'}); wait for it to end or choose "
                        "another --workdir") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

  def release(self) -> None:
    """Drops the lock (closing its file); a second call does nothing."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing the last descriptor drops the flock
      self._fd = None


def lock_run_dir(workdir: pathlib.Path) -> RunDirLock:
  """Makes ``workdir`` and takes its lock: the run's first write, so a
  read-only or full disk is refused here (RunDirError), before training."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    return RunDirLock(workdir)
  except OSError as error:
    raise RunDirError(f"workdir {str(workdir)!r} cannot be written "
                      f"({error.strerror or error}); nothing was changed") from None


def clear_run(workdir: pathlib.Path) -> None:
  """Deletes a run's files and folders (``RUN_FILES``) from ``workdir``, nothing else."""
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
