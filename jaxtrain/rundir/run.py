"""A run directory around :func:`jaxtrain.fit`: config, logs, checkpoints, resume.

``run(...)`` is what experiments call. On a new directory it trains from
scratch; on a directory holding the same run (same config but for the number of
epochs) it resumes from the latest good checkpoint, so running a command again
after a crash or preemption continues it, and a larger ``--epochs`` extends a
finished run; a directory holding a different run is refused unless
``overwrite``. SIGTERM and SIGINT finish the current compiled call, save and end
the run cleanly. Nothing is written before all input has been checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jaxtrain.core.state import TrainState
from jaxtrain.data.batching import num_batches
from jaxtrain.data.indexed import length
from jaxtrain.engine import distributed
from jaxtrain.rundir.checkpoint import DIRECTORY, CheckpointConfig, Checkpointer
from jaxtrain.rundir.checkpointer import RecordingCheckpointer
from jaxtrain.rundir.group import RunCall
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.rundir.plots import plot_curves, read_history
from jaxtrain.rundir.record import (  # noqa: F401 - NOT_IDENTITY: part of this API
  NOT_IDENTITY,
  check_record,
  checkpoint_record,
  differences,
  jsonable,
  read_config,
  write_config,
)
from jaxtrain.train.config import FitConfig, columns
from jaxtrain.train.fit import FitResult, fit


class RunDirError(ValueError):
  """The run directory cannot be used as asked (it holds another run)."""


# What a run writes; overwrite removes only these, never a user's other files.
RUN_FILES = ("config.json", "metrics.csv", "steps.jsonl", "curves.png", "tensorboard",
             DIRECTORY, f"{DIRECTORY}_damaged")
def _import_matplotlib() -> None:
  try:
    import matplotlib.figure  # noqa: F401
    from matplotlib.backends import backend_agg  # noqa: F401
  except ImportError:  # plot_curves says so itself
    pass


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


class _RunDirectory:
  """Opens the run directory for ``fit`` once its config is checked: only then
  is a different run there cleared, and the checkpointer made."""

  def __init__(self, workdir: pathlib.Path, checkpoint: CheckpointConfig | None, *,
               resume: bool, record: Mapping[str, Any]):
    self.workdir, self.checkpoint, self.resume = workdir, checkpoint, resume
    self.record = jsonable(dict(record), absolute=True)
    self.checkpointer: Checkpointer | None = None
    self.lock: RunDirLock | None = None

  @property
  def config(self) -> CheckpointConfig | None:
    """The checkpoint config (``fit`` reads it before opening the directory)."""
    return self.checkpoint

  def __call__(self) -> Checkpointer | None:
    return self.open()

  def open(self) -> Checkpointer | None:
    if distributed.is_primary():
      self.lock = lock_run_dir(self.workdir)  # before anything there changes
      if not self.resume:
        clear_run(self.workdir)
    _wait_for_every_process("jaxtrain: run directory ready")
    if self.checkpoint is not None:
      self.checkpointer = RecordingCheckpointer(self.workdir, self.checkpoint, self.record)
    return self.checkpointer

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()

  def release(self) -> None:
    if self.lock is not None:
      self.lock.release()


def _wait_for_every_process(name: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def clear_run(workdir: pathlib.Path) -> None:
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()


# Handlers of run() calls made inside ``intercepted`` (innermost last).
_INTERCEPT: list[Callable[[RunCall], Any]] = []


@contextlib.contextmanager
def intercepted(handler: Callable[[RunCall], Any]):
  """Within it, ``run(...)`` returns ``handler(RunCall(...))`` instead of
  training; a ``run`` called by the handler itself trains. A sweep collects an
  experiment's runs with it (to train them in one program) or observes them."""
  _INTERCEPT.append(handler)
  try:
    yield
  finally:
    _INTERCEPT.remove(handler)


def run_call(call: RunCall) -> FitResult:
  """``run`` with the arguments of ``call``."""
  fields = {f.name: getattr(call, f.name) for f in dataclasses.fields(call)}
  return run(fields.pop("state"), fields.pop("train"), **fields)


@contextlib.contextmanager
def stop_on_signals():
  """Turns SIGTERM/SIGINT into a polled stop request.

  A handler it replaces that keeps a ``received`` list (the command line's,
  installed at start-up) hands over the signals it got before: the run stops
  at once; a run stopped by a signal hands it back, so that a SIGINT while the
  process finishes (curves, summaries) is the second one. A second SIGINT
  calls that handler's ``abort`` (one line, exit at once), else raises
  KeyboardInterrupt. (Inside a compiled call no Python
  handler runs: the command line's wakeup-fd watcher aborts there, whichever
  handler is installed.)
  """
  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return
  before = signal.getsignal(signal.SIGTERM)
  pending = getattr(before, "received", None)
  received: list[str] = list(pending or [])
  if pending:
    pending.clear()  # this run answers them

  def handler(signum, frame):
    name = signal.Signals(signum).name
    if received and signum == signal.SIGINT:
      abort = getattr(before, "abort", None)
      if abort is not None:
        abort(name)
      raise KeyboardInterrupt
    received.append(name)

  handler.received, handler.abort = received, getattr(before, "abort", None)
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda: received[0] if received else None
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    if received and pending is not None:
      pending.extend(received)  # still a stop request: a SIGINT now is the second
    elif (forget := getattr(before, "forget", None)) is not None:
      forget()  # the command line's watcher of a second SIGINT: none was answered


def run(state: TrainState, train: Mapping[str, Any], *, config: FitConfig,
        workdir: str | os.PathLike, record: Mapping[str, Any],
        val: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
        augment: Callable | None = None, overwrite: bool = False,
        checkpoint: CheckpointConfig | None = CheckpointConfig(),
        extra_curves: Mapping[str, Any] | None = None,
        build: str | None = None) -> FitResult:
  """Trains into a run directory, resuming the run already there.

  Args:
    state, train, config, val, test, augment: as for :func:`jaxtrain.fit`.
    workdir: the run directory.
    record: the experiment's resolved config, written to ``config.json``; it
      identifies the run (all but epoch counts and checkpoint cadence).
    overwrite: replace a different run already in ``workdir``.
    checkpoint: when to checkpoint (``None``: never, and never resume).
    extra_curves: other runs' histories to overlay on ``curves.png``.
    build: ``"module:function"``, importable, that rebuilds the run's state
      from its config.json record (``function(record) -> TrainState``); written
      there as ``"build"`` so that :func:`jaxtrain.checkpoint.load` needs no
      ``like=``. It is not part of the run's identity.

  Returns:
    The :class:`~jaxtrain.FitResult`; its history covers the whole run, also
    the part before a resume.
  """
  if _INTERCEPT:
    handler = _INTERCEPT.pop()
    try:
      return handler(RunCall(state, train, config, pathlib.Path(workdir), record, val, test,
                             augment, overwrite, checkpoint, extra_curves, build))
    finally:
      _INTERCEPT.append(handler)
  workdir = pathlib.Path(workdir)
  record = {**record, "checkpoint": checkpoint, **({"build": build} if build else {})}
  check_record(record)
  resume = check_workdir(workdir, record, overwrite=overwrite) and checkpoint is not None
  directory = _RunDirectory(workdir, checkpoint, resume=resume, record=record)

  primary = distributed.is_primary()

  def make_monitor(rows, step_records):
    # Called by fit once the checkpoint (if any) is read and checked. Only
    # process 0 writes the run's files; every process checkpoints.
    if not primary:
      return None
    write_config(workdir, dict(record))
    steps_per_epoch = num_batches(length(train), config.update_batch_size,
                                  config.drop_remainder)
    return RunMonitor(workdir, columns=columns(state, config, train, has_val=val is not None), total_steps=config.epochs * steps_per_epoch,
                      steps_per_epoch=steps_per_epoch, progress=config.progress,
                      lines=config.progress is not False,
                      resume_rows=rows, resume_step_records=step_records)

  # matplotlib takes ~0.3 s to import; do it while the run trains.
  threading.Thread(target=_import_matplotlib, name="import-matplotlib", daemon=True).start()
  try:
    try:
      with stop_on_signals() as should_stop:
        result = fit(state, train, config=config, val=val, test=test, augment=augment,
                     monitor=make_monitor, checkpointer=directory,
                     should_stop=should_stop, log=None if primary else _quiet)
    finally:
      directory.close()
    if primary:
      result.history = read_history(workdir)
      plot_curves(result.history, workdir / "curves.png", extra=extra_curves)
  finally:
    directory.release()
  return result


def _quiet(message: str) -> None:
  """The log of processes other than 0: process 0 says it."""
