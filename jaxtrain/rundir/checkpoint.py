"""Orbax checkpoints of a whole run, for exact resume and for research code.

A checkpoint holds the run record: the TrainState arrays (params, batch_stats,
opt_state, step), the best epoch's parameters when early stopping restores them,
and as JSON the position (epoch and batch inside it), the early-stopping record,
the epoch rows written so far, the current epoch's per-step metrics and the run's
seed and base key. Resuming from it continues the very same run: every key is
derived from the seed and the step, and the data order from the seed and epoch.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save never resumes from a half-written one; a
checkpoint that fails to restore (a truncated or deleted file) is skipped with a
warning for the previous one. Arrays are stored with tensorstore; nothing is
pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax

from jaxtrain.core.state import TrainState, state_arrays, with_arrays
from jaxtrain.rundir import integrity
from jaxtrain.rundir.compat import CheckpointError, check_compatible
from jaxtrain.rundir.integrity import CheckpointSaveError  # noqa: F401 - part of this API

DIRECTORY = "checkpoints"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and what to keep.

  Saves happen at compiled-call boundaries: at epoch ends, and inside an epoch
  every ``every_steps`` steps (the loop cuts its calls there). A save is always
  made at the end of the run and on SIGTERM/SIGINT.

  Attributes:
    every_epochs: save every N epochs (0: not by epoch count).
    every_steps: save every N steps, also mid-epoch (0: not by step count).
    every_seconds: save at the first boundary after N seconds since the last
      save at the latest (0: not by time).
    adaptive: with ``every_seconds``, save sooner: once the time since the
      last save is 20 times what a save costs here (measured, the arrays'
      copy to the host; 0.1 s assumed before the first), and at least
      ``ADAPTIVE_MIN_SECONDS`` (5 s): saving stays under 5% of the training
      time, a 20 s run has a checkpoint within its first 5 s, and a long run
      saves every few seconds to minutes, at most every ``every_seconds``.
    keep: how many of the latest checkpoints to keep.
    keep_best: also keep the best checkpoint by the monitored metric.
    monitor: metrics.csv column ranking checkpoints (val_loss; the run's
      train_loss when it has no validation set).
    mode: min or max.
    async_save: write in the background so training does not wait on the disk.
  """

  every_epochs: int = 0
  every_steps: int = 0
  every_seconds: float = 300.0
  adaptive: bool = True
  keep: int = 2
  keep_best: bool = True
  monitor: str = "val_loss"
  mode: str = "min"
  async_save: bool = True

  def __post_init__(self):
    for name in ("every_epochs", "every_steps", "every_seconds"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"checkpoint {name} must be >= 0, got {getattr(self, name)}")
    if self.keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {self.keep}")
    if self.mode not in ("min", "max"):
      raise ValueError(f"checkpoint mode must be 'min' or 'max', got {self.mode!r}")


class Checkpointer:
  """Saves and restores a run's checkpoints under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str | os.PathLike, config: CheckpointConfig | None = None,
               *, read_only: bool = False):
    self.config = config or CheckpointConfig()
    self.read_only = read_only
    self.directory = pathlib.Path(workdir).absolute() / DIRECTORY
    self._ocp = ocp = integrity.import_orbax()
    if jax.process_index() == 0:
      integrity.check_side_files(self.directory, read_only=read_only)
    from orbax.checkpoint import checkpoint_managers as managers

    sign = -1.0 if self.config.mode == "min" else 1.0
    policies = [managers.LatestN(n=self.config.keep)]
    if self.config.keep_best:
      # BestN keeps the highest values: negate a metric to minimise.
      policies.append(managers.BestN(
          get_metric_fn=lambda m: sign * m["value"], n=1,
          keep_checkpoints_without_metrics=False))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.config.async_save,
            preservation_policy=managers.AnyPreservationPolicy(policies),
            # Orbax writes a checkpoint's metrics to disk only with a best_fn;
            # BestN needs them again after a restart.
            best_fn=lambda m: m["value"], best_mode=self.config.mode,
            # A reader must not touch a save in progress by the training run.
            cleanup_tmp_directories=not read_only, read_only=read_only,
            todelete_subdir=None if read_only else integrity.DELETING,
        ),
        item_handlers={"arrays": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )
    self.last_save = time.monotonic()
    self.save_seconds: list[float] = []

  def save_interval(self) -> float:
    """Seconds between time-based saves now (``inf``: none by time)."""
    from jaxtrain.train.cadence import save_interval

    return save_interval(self.config.every_seconds, self.config.adaptive, self.save_seconds)

  def seconds_since_save(self) -> float:
    """Seconds since the last save (or since this checkpointer was made)."""
    return time.monotonic() - self.last_save

  # -- save / restore --------------------------------------------------------

  def save(self, step: int, arrays: dict[str, Any], meta: dict[str, Any],
           metric: float | None = None) -> None:
    """Saves (asynchronously by default); returns once the arrays are copied."""
    started = time.perf_counter()
    metrics = None if metric is None or math.isnan(metric) else {"value": float(metric)}
    ocp = self._ocp
    try:  # a failed asynchronous save raises here, at the next one, or in wait()
      if jax.process_index() == 0:
        integrity.purge_deleted(self.directory)
      self.manager.save(
          step,
          args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                  meta=ocp.args.JsonSave(integrity.with_digest(meta))),
          metrics=metrics, force=True)
    except Exception as error:  # noqa: BLE001 - a write failure, named; else a bug: raised
      raise integrity.save_failed(self.directory, error) if integrity.is_write_failure(
          error) else error
    self.save_seconds.append(time.perf_counter() - started)
    self.last_save = time.monotonic()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, like_arrays, step: int | None = None):
    """Restores ``(step, arrays, meta)`` from ``step`` or the latest good one.

    ``like_arrays`` is the tree to restore into (its top-level entries, e.g.
    ``{"state": ...}`` alone, are what is read), or a function from a
    checkpoint's saved tree (metadata) to it. A checkpoint that fails to read is
    skipped with a warning (falling back to the previous one) and moved to
    ``checkpoints_damaged/``; one that reads but does not fit raises
    :class:`CheckpointError`. Returns None when there is no checkpoint.
    """
    ocp = self._ocp
    candidates = [step] if step is not None else self.steps()[::-1]
    damaged = []
    for candidate in candidates:
      try:
        saved = self.manager.item_metadata(candidate)["arrays"]
        if saved is None:
          raise OSError("no array metadata")
        like = like_arrays(saved) if callable(like_arrays) else like_arrays
        check_compatible({k: v for k, v in saved.items() if k in like}, like,
                         f"{self.directory / str(candidate)}")
        like_arrays = like
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_arrays)
        # Parts of the checkpoint not asked for (e.g. the best epoch's
        # parameters) are read as saved and dropped: Orbax restores whole trees.
        rest = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), v)
                for k, v in saved.items() if k not in like}
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore({**abstract, **rest}),
            meta=ocp.args.JsonRestore()))
        integrity.check_digest(restored["meta"])
        self._set_aside(damaged)
        arrays = {k: v for k, v in restored["arrays"].items() if k in like}
        return candidate, arrays, restored["meta"]
      except CheckpointError:
        raise
      except Exception as error:  # noqa: BLE001 - any read failure means damaged
        if step is not None:
          raise CheckpointError(
              f"checkpoint {step} in {self.directory} cannot be read: {error}") from error
        warnings.warn(
            f"checkpoint {candidate} in {self.directory} is damaged "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "falling back to the previous one", stacklevel=2)
        damaged.append(candidate)
    self._set_aside(damaged)
    return None

  def _set_aside(self, steps) -> None:
    """Moves damaged checkpoints out of the way (kept for inspection), so the
    resumed run can save those steps again."""
    if self.read_only or not steps:
      return
    aside = self.directory.parent / f"{DIRECTORY}_damaged"
    aside.mkdir(exist_ok=True)
    for step in steps:
      source = self.directory / str(step)
      if source.exists():
        target = aside / f"{step}-{time.time_ns()}"
        source.rename(target)
    self.manager.reload()

  def best_step(self) -> int | None:
    """The kept checkpoint with the best monitored value."""
    sign = 1.0 if self.config.mode == "min" else -1.0
    scored = []
    for step in self.steps():
      metrics = self.manager.metrics(step)
      if metrics and "value" in metrics:
        scored.append((sign * metrics["value"], step))
    return min(scored)[1] if scored else None

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
      raise integrity.save_failed(self.directory, error) if integrity.is_write_failure(
          error) else error

  def close(self) -> None:
    try:
      self.wait()
    except BaseException:
      with contextlib.suppress(Exception):  # the save's error is the one to report
        self.manager.close()
      raise
    self.manager.close()
    if not self.read_only and jax.process_index() == 0:
      integrity.purge_deleted(self.directory, closing=True)


def load(run_dir: str | os.PathLike, step: int | str | None = None, *,
         like: TrainState | None = None,
         build: str | Callable[[dict], TrainState] | None = None) -> TrainState:
  """Loads a run's checkpoint as a TrainState ready for eval_step or training.

  Reading changes nothing in the run directory (also while the run trains).

  Args:
    run_dir: a run directory written by an experiment (or :func:`jaxtrain.run.run`).
    step: a checkpoint step; ``None`` for the latest good one; ``"best"`` for
      the parameters of the run's best epoch by the monitored metric, whatever
      the cadence (:func:`best_epoch` says which): the whole checkpoint of that
      step when one was kept, else the best parameters every checkpoint holds,
      with the latest checkpoint's step and optimizer state.
    like: a state of the same model and optimizer to restore into.
    build: without ``like``, what rebuilds that state from the run's
      ``config.json`` record: a function ``record -> TrainState`` or an
      importable ``"module:function"``. Default: the ``"build"`` entry of
      ``config.json``, which :func:`jaxtrain.run.run` writes when given
      ``build=`` (every experiment does). Building never reads a dataset.

  Returns:
    The restored :class:`~jaxtrain.TrainState`.
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
  Reading changes nothing in the run directory."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / DIRECTORY).is_dir():
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoints")
  checkpointer = Checkpointer(run_dir, _checkpoint_config(run_dir), read_only=True)
  try:
    for step in checkpointer.steps()[::-1]:
      try:
        meta = checkpointer.manager.restore(step, args=checkpointer._ocp.args.Composite(
            meta=checkpointer._ocp.args.JsonRestore()))["meta"]
      except Exception:  # noqa: BLE001 - a damaged checkpoint: try the previous
        continue
      return _best_of(meta["position"])
  finally:
    checkpointer.close()
  raise CheckpointError(f"run directory {str(run_dir)!r} holds no readable checkpoint")


def _best_of(position: dict) -> dict[str, Any]:
  best, rows = position["best"], position["rows"]
  epoch = best["epoch"]
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
  step = _best_of(meta["position"])["step"]
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
  ``fit`` with a Checkpointer of your own, without config.json)."""
  path = run_dir / "config.json"
  if not path.exists():
    return CheckpointConfig()
  record = json.loads(path.read_text())
  saved = record.get("checkpoint") or {}
  fields = {f.name for f in dataclasses.fields(CheckpointConfig)}
  return CheckpointConfig(**{k: v for k, v in saved.items() if k in fields})


def _rebuild_state(run_dir: pathlib.Path, build) -> TrainState:
  path = run_dir / "config.json"
  if not path.exists():
    raise CheckpointError(f"{str(path)!r} is missing: pass like= to load()")
  record = json.loads(path.read_text())
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
