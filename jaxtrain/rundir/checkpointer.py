"""The Orbax side of a run's checkpoints: when to save (:class:`CheckpointConfig`)
and the manager that writes, restores and prunes them (:class:`Checkpointer`).
Orbax is imported when the first Checkpointer is made (``import jaxtrain``
stays light).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import shutil
import time
import warnings
import weakref
from typing import Any

import jax

from jaxtrain.rundir import digest, integrity
from jaxtrain.rundir.compat import CheckpointError, check_compatible

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
    self._ocp = integrity.import_orbax()
    # A writer (process 0) moves damaged side files aside; every reader gets its
    # own temporary view of the checkpoints without them (None: nothing damaged).
    self._view = None
    if read_only or jax.process_index() == 0:
      self._view = integrity.check_side_files(self.directory, read_only=read_only)
    if self._view is not None:
      weakref.finalize(self, shutil.rmtree, self._view, True)  # also if never closed
    try:
      self.manager = self._open_manager()
    except BaseException:
      self._remove_view()
      raise
    self.last_save = time.monotonic()
    self.save_seconds: list[float] = []

  def _open_manager(self):
    ocp = self._ocp
    from orbax.checkpoint import checkpoint_managers as managers

    sign = -1.0 if self.config.mode == "min" else 1.0
    policies = [managers.LatestN(n=self.config.keep)]
    if self.config.keep_best:
      # BestN keeps the highest values: negate a metric to minimise.
      policies.append(managers.BestN(
          get_metric_fn=lambda m: sign * m["value"], n=1,
          keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManager(
        self._view or self.directory,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.config.async_save,
            preservation_policy=managers.AnyPreservationPolicy(policies),
            # Orbax writes a checkpoint's metrics to disk only with a best_fn;
            # BestN needs them again after a restart.
            best_fn=lambda m: m["value"], best_mode=self.config.mode,
            # A reader must not touch a save in progress by the training run.
            cleanup_tmp_directories=not self.read_only, read_only=self.read_only,
            todelete_subdir=None if self.read_only else integrity.DELETING,
        ),
        item_handlers={"arrays": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )

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
    sha = digest.arrays_digest(arrays, step, meta)  # ties the arrays to the step and run
    meta = meta if sha is None else {**meta, digest.KEY: sha}
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
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_arrays)
        # Parts of the checkpoint not asked for (e.g. the best epoch's
        # parameters) are read as saved and dropped: Orbax restores whole trees.
        rest = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), v)
                for k, v in saved.items() if k not in like}
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore({**abstract, **rest}),
            meta=ocp.args.JsonRestore()))
        integrity.check_digest(restored["meta"])
        digest.check_arrays(restored["arrays"], candidate, restored["meta"], saved)
        self._set_aside(damaged)
        arrays = {k: v for k, v in restored["arrays"].items() if k in like}
        return candidate, arrays, restored["meta"]
      except CheckpointError:
        raise
      except Exception as error:  # noqa: BLE001 - any read failure means damaged
        if step is not None:
          raise CheckpointError(
              f"checkpoint {step} in {self.directory} cannot be read: {self._named(error)}") from error
        warnings.warn(
            f"checkpoint {candidate} in {self.directory} is damaged "
            f"({type(error).__name__}: {self._named(error, first_line=True)}); "
            "falling back to the previous one", stacklevel=2)
        damaged.append(candidate)
    self._set_aside(damaged)
    return None

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON part of checkpoint ``step`` (position, step log, seed), without
    its arrays."""
    ocp = self._ocp
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
      try:
        self.wait()
      except BaseException:
        with contextlib.suppress(Exception):  # the save's error is the one to report
          self.manager.close()
        raise
      self.manager.close()
    finally:
      self._remove_view()
    if not self.read_only and jax.process_index() == 0:
      integrity.purge_deleted(self.directory, closing=True)

  def _remove_view(self) -> None:
    if self._view is not None:
      shutil.rmtree(self._view, ignore_errors=True)  # links only

  def _named(self, error: BaseException, *, first_line: bool = False) -> str:
    """An Orbax error's text (or first line), naming the run's directory, not a view."""
    text = str(error)
    if self._view is not None:
      text = text.replace(str(self._view), str(self.directory))
    return text.splitlines()[0][:200] if first_line and text else text


class RecordingCheckpointer(Checkpointer):
  """Checkpoints that also hold the run's record (config.json without its
  environment): a run whose config.json is lost is recognised by them."""

  def __init__(self, workdir, config: CheckpointConfig, record: dict):
    super().__init__(workdir, config)
    self.record = record

  def save(self, step, arrays, meta, metric=None):
    super().save(step, arrays, {**meta, "record": self.record}, metric)
