"""Where a run starts: the latest good checkpoint's position and arrays, and
the monitor opened at that position (so its files keep exactly the rows and
step records the checkpoint counts)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jaxtrain.engine import distributed
from jaxtrain.train.ledger import Position, StepLog
from jaxtrain.train.logstore import FOLDER, RowLog, is_reference, prune, read_rows


def resume(checkpointer, tree, say, start: Position, num_train: int, epochs: int | None = None,
           seed: int | None = None) -> tuple[Position, Any, StepLog | None, RowLog]:
  """The position, arrays, step log (None when the checkpoint holds none) and
  epoch rows' log of the latest good checkpoint, else ``start``'s.

  A checkpoint records its epoch rows and ``steps.jsonl`` by count and digest,
  the lines being in its directory's log segments (:mod:`jaxtrain.train.logstore`);
  older ones hold them. Rows that do not read back cost a warning: the run
  goes on, ``metrics.csv`` keeps the rows it has. Segments past the counts of
  the checkpoint resumed (of none: a fresh start) are removed.

  A checkpoint past ``epochs`` is refused (ValueError): a finished run is not
  shortened, and nothing has been written yet."""
  restored = (checkpointer.restore(lambda saved: {k: v for k, v in tree.items() if k in saved})
              if checkpointer is not None else None)
  folder = pathlib.Path(checkpointer.directory) / FOLDER if checkpointer is not None else None
  if restored is None:
    if folder is not None and distributed.is_primary():
      prune(folder, {"rows": 0, "steps": 0})  # segments of no checkpoint
    return start, tree, None, RowLog(folder=folder if distributed.is_primary() else None)
  step, restored, meta = restored
  position, rows_log = _with_rows(
      step, check_resumable(step, meta, checkpointer.directory, num_train, epochs,
                            seed), folder)
  if "best" in tree and "best" not in restored:
    # Written by a run that kept no best parameters (an earlier jaxtrain):
    # the best is ranked afresh from the resume on.
    restored["best"] = jax.tree.map(jnp.copy, {k: restored["state"][k]
                                               for k in ("params", "batch_stats")})
    position = dataclasses.replace(
        position, best=dataclasses.replace(position.best, value=math.nan))
  tree = restored
  say(f"resuming from the checkpoint at step {step} (epoch {position.epoch + 1}, "
      f"batch {position.batch}) in {checkpointer.directory}")
  log = meta.get("step_log")
  if is_reference(log):
    log = StepLog(position.step_records, sha256=log["sha256"], folder=str(folder))
  elif log is not None:
    log = StepLog(position.step_records, tuple(log))
  return position, tree, log, rows_log


def _with_rows(step: int, position: Position, folder: pathlib.Path
               ) -> tuple[Position, RowLog]:
  """``position`` with its epoch rows (read back from the log segments in
  ``folder`` when the checkpoint counts them), and their log."""
  rows, primary = position.rows, distributed.is_primary()
  if primary:  # segments written after this checkpoint, by a run now gone
    prune(folder, {"rows": rows["records"] if is_reference(rows) else len(rows),
                   "steps": position.step_records})
  writes = folder if primary else None
  if not is_reference(rows):  # an older checkpoint: its JSON holds them
    rows_log = RowLog.of(rows, writes)
  elif (found := read_rows(folder, rows)) is not None:
    rows, rows_log = found[0], RowLog(len(found[0]), found[1], writes)
  else:
    warnings.warn(f"the epoch rows of the checkpoint at step {step} do not read back from "
                  f"{folder} (deleted or damaged); metrics.csv keeps the rows it has",
                  stacklevel=4)
    rows, rows_log = [], RowLog(rows["records"], missing=rows["records"])
  return dataclasses.replace(position, rows=rows), rows_log


def check_resumable(step: int, meta: dict, directory, num_train: int,
                    epochs: int | None = None, seed: int | None = None) -> Position:
  """The position a run resumes at from checkpoint ``step`` (its ``meta``),
  or ValueError when this run cannot continue it: other training data, a
  checkpoint of no run (``checkpoint.save``), of another seed's run, or more
  epochs done than ``epochs``. Pure: a run directory checks it before
  anything there changes."""
  if seed is not None and meta.get("seed", seed) != seed:
    raise ValueError(f"the checkpoint at step {step} in {directory} belongs to a run of seed "
                     f"{meta['seed']}, not {seed}: give that seed to continue it, or start a "
                     "new run directory")
  if meta.get("num_train", num_train) != num_train:
    raise ValueError(f"the training set has {num_train} rows, but the checkpoint at step {step} "
                     f"in {directory} was trained on {meta['num_train']}: "
                     "resume with the same data, or start a new run directory")
  if "position" not in meta:
    raise ValueError(f"the checkpoint at step {step} in {directory} records no "
                     "run position (written by jaxtrain.checkpoint.save): fit resumes only "
                     "its own checkpoints; load it with checkpoint.load(..., like=state) and "
                     "pass that state to fit, with another checkpoint directory")
  position = Position.from_json(meta["position"])
  if epochs is not None and (position.epoch, position.batch) > (epochs, 0):
    done = (f"{position.epoch} epochs" if not position.batch else
            f"{position.epoch} epochs and {position.batch} batches")
    raise ValueError(f"--epochs {epochs} is fewer than the {done} the run in "
                     f"{pathlib.Path(directory).parent} has trained; give --epochs "
                     f"{position.epoch + bool(position.batch)} or more to continue it, or "
                     "another --workdir")
  return position


def open_monitor(monitor, position: Position, step_log: StepLog | None = None,
                 rows_log: RowLog | None = None):
  """A monitor, built now from a factory ``(rows, step_records) -> monitor``
  once the position is known (``rows``: the epoch rows, or their count when
  they did not read back; ``step_records``: the checkpoint's :class:`StepLog`
  when it holds one, else the count); returns ``(monitor, owned)``."""
  if monitor is None or hasattr(monitor, "log_steps"):
    return monitor, False
  fresh = position.epoch == 0 and position.batch == 0
  rows = rows_log.missing if rows_log is not None and rows_log.missing else position.rows
  made = monitor(rows, None if fresh else step_log or position.step_records)
  return made, made is not None
