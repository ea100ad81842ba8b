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
import signal
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtrain.core.state import TrainState
from jaxtrain.data.batching import num_batches
from jaxtrain.data.indexed import head, length
from jaxtrain.engine import distributed
from jaxtrain.launch import unblock_stop_signals
from jaxtrain.rundir import trackers as trackers_lib
from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer
from jaxtrain.rundir.checkpointer import RecordingCheckpointer
from jaxtrain.rundir.figures import last_step, log_images, write_images  # noqa: F401 - log_images: part of this API
from jaxtrain.rundir.group import RunCall
from jaxtrain.rundir.integrity import check_digest
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
from jaxtrain.rundir.workdir import (  # noqa: F401 - part of this API
  LOCK,
  RUN_FILES,
  RunDirError,
  RunDirLock,
  check_workdir,
  clear_run,
  lock_run_dir,
)
from jaxtrain.rundir.writers import TensorBoardWriter, Writer
from jaxtrain.train.config import FitConfig, columns
from jaxtrain.train.fit import FitResult, fit
from jaxtrain.train.resume import check_resumable
from jaxtrain.train.summary import summary


def _import_matplotlib() -> None:
  try:
    import matplotlib.figure  # noqa: F401
    from matplotlib.backends import backend_agg  # noqa: F401
  except ImportError:  # plot_curves says so itself
    pass


class _RunDirectory:
  """Opens the run directory for ``fit`` once its config is checked: only then
  is a different run there cleared, and the checkpointer made."""

  def __init__(self, workdir: pathlib.Path, checkpoint: CheckpointConfig | None, *,
               resume: bool, record: Mapping[str, Any], num_train: int = 0,
               epochs: int | None = None, seed: int | None = None):
    self.workdir, self.checkpoint, self.resume = workdir, checkpoint, resume
    self.num_train, self.epochs, self.seed = num_train, epochs, seed
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
    # Every process reads; any refusal is every process's, before any change.
    refusal = self.refusal()
    if distributed.agree([refusal is not None], "max", name="refusal")[0] and not refusal:
      refusal = "another process refused to resume this run (its message says why)"
    if refusal:
      raise ValueError(refusal)
    if distributed.is_primary():
      self.lock = lock_run_dir(self.workdir)  # before anything there changes
      if not self.resume:
        clear_run(self.workdir)
    _wait_for_every_process("jaxtrain: run directory ready")
    if self.checkpoint is not None:
      self.checkpointer = RecordingCheckpointer(self.workdir, self.checkpoint, self.record)
    return self.checkpointer

  def refusal(self) -> str | None:
    """Why this run cannot continue the one in the directory (None: it can),
    from the latest checkpoint whose meta reads, changing nothing (no damaged
    file moved, no deletion purged, no lock taken)."""
    if not self.resume or self.checkpoint is None:
      return None
    with warnings.catch_warnings():  # damage: the run that opens it says so
      warnings.simplefilter("ignore")
      return self._refusal(Checkpointer(self.workdir, read_only=True))

  def _refusal(self, reader: Checkpointer) -> str | None:
    try:
      for step in reversed(reader.steps()):
        try:
          meta = reader.read_meta(step)
          check_digest(meta)
        except Exception:  # noqa: BLE001 - damaged: the run falls back past it
          continue
        try:
          check_resumable(step, meta, reader.directory, self.num_train, self.epochs,
                          self.seed)
        except ValueError as error:
          return str(error)
        return None
      return None
    finally:
      reader.close()

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
  unblock_stop_signals()  # jaxtrain.launch starts its ranks with them blocked
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
        build: str | None = None, callbacks: list | None = None,
        track: str | Sequence[str] | None = None, writers: Sequence[Writer] = ()) -> FitResult:
  """Trains into a run directory, resuming the run already there.

  Args:
    state, train, config, val, test, augment, callbacks: as for :func:`jaxtrain.fit`
      (a callback that raises: :class:`~jaxtrain.train.callbacks.CallbackError`,
      the run saved first).
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

  Raises:
    ValueError: a bad argument (a tracker not installed), or a ``workdir`` that holds another run
      (without ``overwrite``), is locked by another process or cannot be
      written; the message names it, and nothing was changed.

  >>> import tempfile, jax, jax.numpy as jnp, jaxtrain
  >>> moons = jaxtrain.data.load("two_moons", key=jax.random.key(0), n_samples=100)
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2), jaxtrain.make_optimizer("sgd", 0.1),
  ...     jax.random.key(0), jnp.zeros((1, 2)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> workdir = pathlib.Path(tempfile.mkdtemp())
  >>> result = run(state, moons.train, val=moons.val, workdir=workdir, record={"experiment": "doc"},
  ...              config=jaxtrain.FitConfig(epochs=2, batch_size=32, progress=False))
  >>> len(result.history["epoch"]["val_loss"]), (workdir / "metrics.csv").exists()
  (2, True)
  """
  if _INTERCEPT:
    handler = _INTERCEPT.pop()
    try:
      return handler(RunCall(state, train, config, pathlib.Path(workdir), record, val, test,
                             augment, overwrite, checkpoint, extra_curves, build,
                             callbacks, track, writers))
    finally:
      _INTERCEPT.append(handler)
  workdir = pathlib.Path(workdir)
  record = {**record, "checkpoint": checkpoint, **({"build": build} if build else {})}
  check_record(record)
  track = trackers_lib.check(track)  # a missing tracker: refused before anything is written
  resume = check_workdir(workdir, record, overwrite=overwrite) and checkpoint is not None
  directory = _RunDirectory(workdir, checkpoint, resume=resume, record=record,
                            num_train=length(train), epochs=config.epochs, seed=config.seed)

  primary = distributed.is_primary()
  opened: list[Writer] = []  # the trackers, once the monitor opens them

  def make_monitor(rows, step_records):
    # Called by fit once the checkpoint (if any) is read and checked. Only
    # process 0 writes the run's files; every process checkpoints.
    if not primary:
      return None
    example = head(train, 1)
    model = summary(state, example["inputs"], example["targets"], batch_size=config.batch_size)
    if config.progress is not False:
      print(model, flush=True)
    write_config(workdir, {**record, "summary": model.to_json()})
    steps_per_epoch = num_batches(length(train), config.update_batch_size,
                                  config.drop_remainder)
    opened.extend(trackers_lib.open_trackers(
        track, workdir, experiment=str(record.get("experiment") or workdir.name),
        config=record))
    for tracker in opened:
      if config.progress is not False:
        print(f"tracking: {tracker.where}", flush=True)
    for writer in writers:
      writer.write_config(record)
    # run's own TensorBoard writer: the curves go into its event file at the end.
    tensorboard = TensorBoardWriter(workdir / "tensorboard",
                                    start=RunMonitor.resumed_step(rows, step_records))
    opened.insert(0, tensorboard)
    return RunMonitor(workdir, columns=columns(state, config, train, has_val=val is not None),
                      total_steps=config.epochs * steps_per_epoch,
                      steps_per_epoch=steps_per_epoch, progress=config.progress,
                      lines=config.progress is not False, writers=[*opened[1:], *writers],
                      tensorboard=tensorboard, resume_rows=rows,
                      resume_step_records=step_records)

  # matplotlib takes ~0.3 s to import; do it while the run trains.
  threading.Thread(target=_import_matplotlib, name="import-matplotlib", daemon=True).start()
  try:
    try:
      with stop_on_signals() as should_stop:
        result = fit(state, train, config=config, val=val, test=test, augment=augment,
                     monitor=make_monitor, checkpointer=directory,
                     should_stop=should_stop, log=None if primary else _quiet,
                     callbacks=callbacks)
    finally:
      directory.close()
    if primary:
      result.history = read_history(workdir)
      plot_curves(result.history, workdir / "curves.png", extra=extra_curves)
      if (workdir / "curves.png").exists():
        write_images([*opened, *writers], {"curves": workdir / "curves.png"},
                     last_step(result.history["epoch"]))
  finally:
    try:
      for writer in [*opened, *writers]:
        writer.close()
    finally:
      directory.release()
  return result


def _quiet(message: str) -> None:
  """The log of processes other than 0: process 0 says it."""
