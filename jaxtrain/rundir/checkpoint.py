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

import dataclasses
import importlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

from jaxtrain.core.state import TrainState, state_arrays, with_arrays
from jaxtrain.rundir.checkpointer import (  # noqa: F401 - part of this API
  DIRECTORY,
  CheckpointConfig,
  Checkpointer,
)
from jaxtrain.rundir.compat import CheckpointError
from jaxtrain.rundir.integrity import CheckpointSaveError  # noqa: F401 - part of this API


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
        meta = checkpointer.read_meta(step)
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
