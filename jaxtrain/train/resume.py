"""Where a run starts: the latest good checkpoint's position and arrays, and
the monitor opened at that position (so its files keep exactly the rows and
step records the checkpoint counts)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxtrain.train.ledger import Position, StepLog


def resume(checkpointer, tree, say, start: Position, num_train: int, epochs: int | None = None
           ) -> tuple[Position, Any, StepLog | None]:
  """The position, arrays and step log (None when the checkpoint holds none)
  of the latest good checkpoint, else ``start``.

  A checkpoint past ``epochs`` is refused (ValueError): a finished run is not
  shortened, and nothing has been written yet."""
  restored = (checkpointer.restore(lambda saved: {k: v for k, v in tree.items() if k in saved})
              if checkpointer is not None else None)
  if restored is None:
    return start, tree, None
  step, restored, meta = restored
  if meta.get("num_train", num_train) != num_train:
    raise ValueError(f"the training set has {num_train} rows, but the checkpoint at step {step} "
                     f"in {checkpointer.directory} was trained on {meta['num_train']}: "
                     "resume with the same data, or start a new run directory")
  if "position" not in meta:
    raise ValueError(f"the checkpoint at step {step} in {checkpointer.directory} records no "
                     "run position (written by jaxtrain.checkpoint.save): fit resumes only "
                     "its own checkpoints; load it with checkpoint.load(..., like=state) and "
                     "pass that state to fit, with another checkpoint directory")
  position = Position.from_json(meta["position"])
  if epochs is not None and (position.epoch, position.batch) > (epochs, 0):
    done = (f"{position.epoch} epochs" if not position.batch else
            f"{position.epoch} epochs and {position.batch} batches")
    raise ValueError(f"--epochs {epochs} is fewer than the {done} the run in "
                     f"{checkpointer.directory.parent} has trained; give --epochs "
                     f"{position.epoch + bool(position.batch)} or more to continue it, or "
                     "another --workdir")
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
  return position, tree, None if log is None else StepLog(position.step_records, tuple(log))


def open_monitor(monitor, position: Position, step_log: StepLog | None = None):
  """A monitor, built now from a factory ``(rows, step_records) -> monitor``
  once the position is known (``step_records``: the checkpoint's
  :class:`StepLog` when it holds one, else the count); returns
  ``(monitor, owned)``."""
  if monitor is None or hasattr(monitor, "log_steps"):
    return monitor, False
  fresh = position.epoch == 0 and position.batch == 0
  made = monitor(position.rows, None if fresh else step_log or position.step_records)
  return made, made is not None
