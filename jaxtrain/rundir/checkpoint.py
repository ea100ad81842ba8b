"""Orbax checkpoints of a whole run, for exact resume and for research code.

A checkpoint holds the run record: the TrainState arrays (params, batch_stats,
opt_state, step), the best epoch's parameters when early stopping restores them,
and as JSON the position (epoch and batch inside it), the early-stopping record,
the epoch rows written so far, the current epoch's per-step metrics and the run's
seed and base key. Resuming from it continues the very same run: every key is
derived from the seed and the step, and the data order from the seed and epoch.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save never resumes from a half-written one; a
checkpoint that fails to restore (a truncated or deleted file, or arrays that do
not match the SHA-256 of its step's arrays its JSON records: copied from another
step or run) is skipped with a warning for the previous one. Arrays are stored
with tensorstore; nothing is pickled.

:func:`save` is the writing side for a loop of your own: it checkpoints a
TrainState's arrays (no run record) in the same layout, which :func:`load`
reads back with ``like=``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import operator
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax

from jaxtrain.core.state import TrainState, state_arrays, with_arrays
from jaxtrain.engine import distributed
from jaxtrain.rundir import integrity
from jaxtrain.rundir.checkpointer import (  # noqa: F401 - part of this API
  DIRECTORY,
  CheckpointConfig,
  Checkpointer,
)
from jaxtrain.rundir.compat import CheckpointError
from jaxtrain.rundir.integrity import CheckpointSaveError  # noqa: F401 - part of this API
from jaxtrain.rundir.record import checkpoint_record, read_config
from jaxtrain.rundir.workdir import LOCK, RUN_FILES

# Files a run directory of ``fit``/``run`` holds besides its checkpoints (and
# its lock, which outlives the run): save() leaves such a directory alone.
_RUN_RECORDS = (*RUN_FILES[:3], LOCK)  # config.json, metrics.csv, steps.jsonl
# Open writers by directory, reused by the next save() there: opening one reads
# every kept checkpoint's metadata (about 1 ms each; with 100 kept, a small MLP's
# save took 120 ms opening one against 30 ms reusing it). (pid, keep, writer).
_WRITERS: dict[pathlib.Path, tuple[int, int | None, Checkpointer]] = {}


def save(directory: str | os.PathLike, state: TrainState, *, step: int | None = None,
         keep: int | None = None) -> pathlib.Path:
  """Checkpoints a TrainState's arrays, for a training loop of your own.

  Writes ``<directory>/checkpoints/<step>`` with Orbax (the layout of a run
  directory, so :func:`load` reads it) and returns once the checkpoint is
  committed: Orbax writes into a temporary folder and renames it when complete,
  so a process killed at any moment leaves the previous checkpoints intact and
  never a half-written one. Made to be called in a loop: the writer stays open
  between calls in the same directory (closed at exit).

  It saves the arrays of the state (step, params, batch_stats, opt_state, and
  the plateau, EMA and loss scale when present), not ``apply_fn``, ``tx`` or
  ``loss_fn``: ``load(directory, like=state)`` takes those from ``like``. No
  epochs or metrics are recorded: derive the data position and every key
  from the step, and a resume is exact.

  Args:
    directory: where to save; a run directory written by ``fit`` or an
      experiment is refused (its checkpoints carry the run's record).
    state: the TrainState to save.
    step: the checkpoint's step; default ``int(state.step)``. A step already
      saved there is refused (ValueError).
    keep: how many of the latest checkpoints to keep (older ones are deleted
      after this one is committed); ``None`` keeps all.

  Returns:
    The path of the committed checkpoint.

  >>> import tempfile, jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(4,), outputs=2),
  ...     jaxtrain.make_optimizer("adam", 1e-3), jax.random.key(0),
  ...     jnp.zeros((1, 3)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> directory = tempfile.mkdtemp()
  >>> jaxtrain.checkpoint.save(directory, state).name
  '0'
  >>> restored = jaxtrain.checkpoint.load(directory, like=state)
  >>> bool((restored.params["Dense_0"]["kernel"] == state.params["Dense_0"]["kernel"]).all())
  True
  """
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
    raise ValueError(f"keep must be a positive int or None, got {keep!r}")
  given, step = step, -1
  with contextlib.suppress(TypeError):
    step = operator.index(state.step if given is None else given)
  if step < 0:
    raise ValueError(f"step must be a non-negative integer, got {given!r}")
  workdir = pathlib.Path(directory).absolute()
  records = [name for name in _RUN_RECORDS if (workdir / name).exists()]
  _refuse_together(f"{str(workdir)!r} is a jaxtrain run directory ({', '.join(records)}): "
                   "checkpoint.save would break its resume; save into another directory"
                   if records else None, "checkpoint.save: run directory")
  checkpointer = _writer(workdir, keep)
  _refuse_together(f"a checkpoint of step {step} already exists in "
                   f"{str(checkpointer.directory)!r}; pass another step= or directory"
                   if step in checkpointer.steps() else None, "checkpoint.save: step")
  try:
    checkpointer.save(step, {"state": state_arrays(state)}, {"saved_by": "checkpoint.save"})
    checkpointer.wait()
    if jax.process_index() == 0:
      integrity.purge_deleted(checkpointer.directory, closing=True)  # what keep= dropped
  except BaseException:
    with contextlib.suppress(Exception):  # the save's error is the one to report
      _close_writer(workdir)  # its state is unknown: the next save opens afresh
    raise
  return checkpointer.directory / str(step)


def _refuse_together(refusal: str | None, name: str) -> None:
  """Raises ValueError(refusal), on every process when any refuses: each
  process reads the directory itself, and one that went on to save would wait
  in Orbax's collectives for the others forever."""
  if distributed.agree([refusal is not None], "max", name=name)[0]:
    raise ValueError(refusal or "another process refused this checkpoint.save (its message "
                     "says why)")


def _writer(workdir: pathlib.Path, keep: int | None) -> Checkpointer:
  """The open writer of ``workdir`` when it is still accurate (same process and
  ``keep``, the checkpoints on disk the ones it knows), else a new one."""
  accurate = False
  if workdir in _WRITERS:
    pid, kept, checkpointer = _WRITERS[workdir]
    try:
      on_disk = sorted(int(p.name) for p in checkpointer.directory.iterdir() if p.name.isdigit())
    except OSError:
      on_disk = None
    accurate = pid == os.getpid() and kept == keep and on_disk == checkpointer.steps()
  # Opening a writer is collective in a run of several processes: all reuse or none.
  if distributed.agree([accurate], "min", name="checkpoint.save: writer")[0]:
    return checkpointer
  if workdir in _WRITERS:
    if pid != os.getpid():  # inherited by a fork: the parent's to close
      del _WRITERS[workdir]
    else:
      with contextlib.suppress(Exception):  # stale (its directory changed): replaced
        _close_writer(workdir)
  # Synchronous: save() returns with the checkpoint committed. No "best" to keep.
  config = CheckpointConfig(keep=keep or sys.maxsize, keep_best=False, async_save=False)
  checkpointer = Checkpointer(workdir, config)
  try:
    run_record = False
    with contextlib.suppress(Exception):  # none, or a damaged one: nothing to tell
      run_record = "position" in checkpointer.read_meta(checkpointer.steps()[-1])
    _refuse_together(f"{str(workdir)!r} holds the checkpoints of a jaxtrain run: "
                     "checkpoint.save would break its resume; save into another directory"
                     if run_record else None, "checkpoint.save: run checkpoints")
  except BaseException:
    checkpointer.close()
    raise
  atexit.unregister(_close_writers)  # registered once
  atexit.register(_close_writers)
  _WRITERS[workdir] = (os.getpid(), keep, checkpointer)
  return checkpointer


def _close_writer(workdir: pathlib.Path) -> None:
  _, _, checkpointer = _WRITERS.pop(workdir)
  checkpointer.close()


def _close_writers() -> None:
  """Closes this process's open writers (at exit): their saves are committed
  already; this removes what Orbax set aside for deletion."""
  for workdir, (pid, _, _) in list(_WRITERS.items()):
    if pid == os.getpid():
      _close_writer(workdir)


def load(run_dir: str | os.PathLike, step: int | str | None = None, *,
         like: TrainState | None = None,
         build: str | Callable[[dict], TrainState] | None = None) -> TrainState:
  """Loads a run's checkpoint as a TrainState ready for eval_step or training.

  Reading changes nothing in the run directory (also while the run trains).

  Args:
    run_dir: a run directory written by an experiment (or :func:`jaxtrain.run.run`),
      or a directory written by :func:`save` (then pass ``like``).
    step: a checkpoint step; ``None`` for the latest good one; ``"best"`` for
      the parameters of the run's best epoch by the monitored metric, whatever
      the cadence (:func:`best_epoch` says which): the whole checkpoint of that
      step when one was kept, else the best parameters every checkpoint holds,
      with the latest checkpoint's step and optimizer state.
    like: a state of the same model and optimizer to restore into (the
      result keeps its static parts: ``apply_fn``, ``tx``, ``loss_fn``).
    build: without ``like``, what rebuilds that state from the run's
      ``config.json`` record: a function ``record -> TrainState`` or an
      importable ``"module:function"``. Default: the ``"build"`` entry of
      ``config.json``, which :func:`jaxtrain.run.run` writes when given
      ``build=`` (every experiment does). Building never reads a dataset.

  Returns:
    The restored :class:`~jaxtrain.TrainState`.

  Raises:
    CheckpointError: in one line naming it: no checkpoint (or not that step)
      in ``run_dir``, a checkpoint that does not fit ``like`` (a shape, the
      structure), or nothing to rebuild the state with (no ``like``, no
      ``build``, no config.json).

  >>> import tempfile, jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(4,), outputs=2), jaxtrain.make_optimizer("sgd", 0.1),
  ...     jax.random.key(0), jnp.zeros((1, 3)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> directory = tempfile.mkdtemp()
  >>> _ = jaxtrain.checkpoint.save(directory, state)
  >>> restored = load(directory, like=state)  # the latest checkpoint
  >>> bool((restored.params["Dense_0"]["kernel"] == state.params["Dense_0"]["kernel"]).all())
  True
  """
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / DIRECTORY).is_dir():
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoints")
  if like is None:
    like = _rebuild_state(run_dir, build)
  variables = {"params": like.params, "batch_stats": like.batch_stats}

  def tree_like(saved):
    # The run's checkpoints may also hold the best epoch's variables.
    return {name: state_arrays(like) if name == "state" else variables for name in saved}

  checkpointer = Checkpointer(run_dir, _checkpoint_config(run_dir), read_only=True)
  try:
    if step == "best":
      return _load_best(checkpointer, run_dir, like, tree_like)
    restored = checkpointer.restore(tree_like, step=step)
  finally:
    checkpointer.close()
  if restored is None:
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no readable checkpoint")
  return with_arrays(like, restored[1]["state"])


def best_epoch(run_dir: str | os.PathLike) -> dict[str, Any]:
  """The run's best epoch so far, from its latest good checkpoint:
  ``{"epoch", "step", "value"}`` (the step at the epoch's end, the monitored
  value), what ``load(run_dir, step="best")`` returns the parameters of.
  Reading changes nothing in the run directory. A directory written by
  :func:`save` records no epochs: CheckpointError."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / DIRECTORY).is_dir():
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoints")
  checkpointer = Checkpointer(run_dir, _checkpoint_config(run_dir), read_only=True)
  try:
    for step in checkpointer.steps()[::-1]:
      try:
        meta = checkpointer.read_meta(step)
      except Exception:  # noqa: BLE001 - a damaged checkpoint: try the previous
        continue
      return _best_of(_position(meta, run_dir))
  finally:
    checkpointer.close()
  raise CheckpointError(f"run directory {str(run_dir)!r} holds no readable checkpoint")


def _position(meta: dict, run_dir: pathlib.Path) -> dict:
  """A checkpoint's run position, or the one-line error of checkpoints without one."""
  if "position" not in meta:
    raise CheckpointError(f"{str(run_dir)!r} holds checkpoints written by "
                          "jaxtrain.checkpoint.save, which record no epochs (no best epoch)")
  return meta["position"]


def _best_of(position: dict) -> dict[str, Any]:
  best, rows = position["best"], position["rows"]
  epoch = best["epoch"]
  if isinstance(rows, dict):  # a count and digest (train/logstore.py) with the best's step
    step = rows.get("best_step")
  else:
    step = rows[epoch - 1]["step"] if 0 < epoch <= len(rows) else None
  return {"epoch": epoch, "step": step, "value": best["value"]}


def _load_best(checkpointer: Checkpointer, run_dir, like: TrainState, tree_like) -> TrainState:
  """The best epoch's parameters: the checkpoint saved at its end when kept
  (the whole state of that step), else the best parameters every checkpoint of
  the run holds, in the latest state (its step and optimizer state)."""
  restored = checkpointer.restore(tree_like)
  if restored is None:
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no readable checkpoint")
  latest, arrays, meta = restored
  step = _best_of(_position(meta, run_dir))["step"]
  if step is not None and step != latest and step in checkpointer.steps():
    try:
      return with_arrays(like, checkpointer.restore(tree_like, step=step)[1]["state"])
    except CheckpointError:
      pass  # damaged: the latest checkpoint's copy of the best serves
  if step is not None and step == latest:
    return with_arrays(like, arrays["state"])
  if "best" in arrays:
    return with_arrays(like, {**arrays["state"], **arrays["best"]})
  # Written before runs kept their best parameters: the kept checkpoint with
  # the best monitored value.
  step = checkpointer.best_step()
  if step is None:
    raise CheckpointError(f"run directory {str(run_dir)!r} has no best checkpoint")
  return with_arrays(like, checkpointer.restore(tree_like, step=step)[1]["state"])


def _checkpoint_config(run_dir: pathlib.Path) -> CheckpointConfig:
  """The run's checkpoint config (the default for a directory written by
  ``fit`` with a Checkpointer of your own, or whose config.json is lost: for
  reading, the default serves)."""
  record, _ = read_config(run_dir / "config.json")
  saved = (record or {}).get("checkpoint") or {}
  fields = {f.name for f in dataclasses.fields(CheckpointConfig)}
  return CheckpointConfig(**{k: v for k, v in saved.items() if k in fields})


def _rebuild_state(run_dir: pathlib.Path, build) -> TrainState:
  path = run_dir / "config.json"
  record, problem = read_config(path)
  if problem is not None:  # the run's record, kept by its checkpoints, serves build=
    kept, _ = checkpoint_record(run_dir)
    record = kept if build is not None else None
  if record is None:
    also = " (or build='module:function')" if build is None and kept is not None else ""
    raise CheckpointError(f"{str(path)!r} is {problem}, so the model cannot be rebuilt from "
                          f"it: pass like=state{also} to load() the checkpoints without it")
  build = build or record.get("build")
  if not build:
    raise CheckpointError(f"{str(path)!r} names no builder ('build': 'module:function'): "
                          "pass like= or build= to load()")
  if isinstance(build, str):
    module_name, _, function = build.partition(":")
    try:
      build = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError) as error:
      raise CheckpointError(f"cannot import the builder {build!r} named by {str(path)!r} "
                            f"({error}): pass like= to load()") from error
  return build(record)
