"""What ``fit``'s driver does between compiled calls, on the host.

:func:`absorb` fetches a call's results (one host sync), advances the pure
ledger and logs what it says; :func:`call_back` asks the callbacks due at the
call's end; :func:`save_checkpoint` writes the run's arrays and the position
the ledger keeps; :func:`say_interrupted` says where a signal stopped the run.
They read the run's fixed parts from a :class:`RunContext`; ``fit``
(:mod:`jaxtrain.train.fit`) decides when each is due.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.activations import gradients_and_activations
from jaxtrain.core.state import TrainState, state_arrays
from jaxtrain.data.indexed import head
from jaxtrain.engine import best as best_lib
from jaxtrain.engine import distributed
from jaxtrain.engine.calls import Carry
from jaxtrain.engine.feeds import Feed, fetch
from jaxtrain.train import callbacks as callbacks_lib
from jaxtrain.train.cadence import Cadence, Pace
from jaxtrain.train.config import EpochPlan, FitConfig
from jaxtrain.train.ledger import Advance, Fetched, Position, advance, extend_rows
from jaxtrain.train.logstore import FOLDER
from jaxtrain.train.throughput import Throughput


@dataclasses.dataclass(frozen=True)
class RunContext:
  """The fixed parts of one ``fit``, read by every step of the driver."""

  config: FitConfig
  feed: Feed
  cadence: Cadence
  run_key: jax.Array
  train: dict
  checkpointer: Any
  monitor: Any
  log: Callable[[str], None]
  plan: EpochPlan
  throughput: Throughput | None = None
  rows_log: Any = None  # the epoch rows as checkpoints count them (a logstore.RowLog)
  callbacks: tuple = ()  # callbacks_lib.Callback objects

  @property
  def host_best(self) -> bool:
    """Whether the host keeps the best epoch's parameters (the ranked column
    is not an evaluation mean the programs can rank by)."""
    return self.plan.keep and self.feed.spec.best is None


@dataclasses.dataclass(frozen=True)
class Call:
  """A dispatched call: global steps ``first .. end`` and its chunks."""

  first: int
  end: int
  chunks: list
  started: float



def absorb(run: RunContext, call: Call, position: Position, pace: Pace, state, best, history
            ) -> tuple[Advance, Pace, Any]:
  """Fetches a call (one host sync), advances the ledger and logs what it says.

  ``state`` is the state at the end of ``call`` whenever the cadence made the
  call end for the host (histograms, the best epoch's parameters)."""
  spe = run.feed.spec.steps_per_epoch
  steps, epoch_sums = fetch(call.chunks, spe)
  # The call is charged from its dispatch, or from when the previous call's
  # results arrived if it was queued behind it, to now: calls overlap, these
  # intervals do not, so the epochs' seconds add up to the training time.
  now = time.perf_counter()
  per_step = (now - max(call.started, pace.fetched_at)) / (call.end - call.first)
  pace = pace.after_call(per_step, steps_per_epoch=spe, epochs=run.config.epochs,
                         fetched_at=now)
  done = advance(position, Fetched(call.first, steps, epoch_sums, per_step),
                 steps_per_epoch=spe, nonfinite=run.config.nonfinite,
                 rule=run.config.early_stopping, ranking=run.plan.ranking)
  run.rows_log.add_rows(done.rows)  # for checkpoints: the position keeps the last row only
  done = dataclasses.replace(done, position=dataclasses.replace(
      done.position, rows=done.position.rows[-1:]))
  history["step"].extend({"step": done.steps, **done.metrics})
  if run.monitor is not None:
    run.monitor.log_steps(done.steps, done.metrics)
  if done.nonfinite:
    run.log(done.nonfinite)
  for row in done.rows:
    extend_rows(history["epoch"], row)
    if run.monitor is not None:
      run.monitor.log_epoch({**row, **(run.throughput.rates(row.get("seconds"))
                                       if run.throughput else {})})
      if "histograms" in run.cadence.due(row["step"]):
        run.monitor.log_histograms(row["step"], state.params, *_snapshot(run, state))
  if run.host_best and done.rows and done.position.best.epoch == done.rows[-1]["epoch"]:
    best = jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats})
  if done.early_stop:
    run.log(done.early_stop)
  return done, pace, best


def call_back(run: RunContext, done: Advance, end: int, state):
  """Calls the callbacks due at ``end``: the position (with a callback's stop
  recorded, as early stopping's), the stop reason and the error to raise."""
  spe = run.feed.spec.steps_per_epoch
  row = done.position.rows[-1] if end % spe == 0 and done.position.rows else {
      "step": end, **{k: np.asarray(v)[-1].item() for k, v in done.metrics.items()}}
  event = callbacks_lib.Event(end, end // spe, row, state, end % spe == 0)
  stop, failure = callbacks_lib.respond(
      run.callbacks, event, spe, log_scalars=getattr(run.monitor, "log_scalars", None),
      log_images=getattr(run.monitor, "log_images", None))
  position, reason = done.position, done.reason
  if stop and not failure:
    run.log(f"{stop} at step {end} (epoch {end // spe})")
    if not reason:
      position, reason = dataclasses.replace(position, stop_reason=stop), stop
  return position, reason, failure


def save_checkpoint(run: RunContext, position: Position, carry: Carry, best, *,
                    metric=None) -> None:
  if run.monitor is not None:
    run.monitor.flush()  # the checkpoint counts these lines as written
  saved = {"state": state_arrays(carry.state)}
  if run.plan.keep:
    saved["best"] = best if best is not None else best_lib.variables(carry.best)
  # The logs' new lines go to the checkpoints' log segments; the JSON counts them.
  spe, folder = run.feed.spec.steps_per_epoch, (
      run.checkpointer.directory / FOLDER if distributed.is_primary() else None)
  meta = {"position": run.rows_log.position(position, position.best.step(spe)),
          "seed": run.config.seed, "num_train": run.feed.spec.num_train,
          "run_key": np.asarray(jax.random.key_data(run.run_key)).tolist()}
  if hasattr(run.monitor, "step_log"):  # steps.jsonl so far: a resume restores it
    meta["step_log"] = run.monitor.step_log(folder)
  run.checkpointer.save(position.step(spe), saved, meta, metric)


def say_interrupted(run: RunContext, signal_name: str, position: Position, spe: int, *,
                 trained: bool = True) -> str:
  step = position.step(spe)
  where = f"step {step} (epoch {position.epoch + 1}, batch {position.batch})"
  if not trained and step == 0:
    run.log(f"{signal_name}: stopped before training began; nothing to save; "
            "run the same command to start")
  elif not trained and run.checkpointer is not None:
    run.log(f"{signal_name}: stopped before training further; the checkpoint at {where} in "
            f"{run.checkpointer.directory} is kept; run the same command to resume")
  elif run.checkpointer is not None:
    run.log(f"{signal_name}: saved a checkpoint at {where} in {run.checkpointer.directory}; "
            "run the same command to resume")
  else:
    run.log(f"{signal_name}: stopped at {where}; checkpointing is off, nothing was saved")
  return f"interrupted by {signal_name}"


def _snapshot(run: RunContext, state: TrainState):
  """The gradient and the activations on the first training batch, for histograms."""
  batch = head(run.train, run.config.batch_size)
  return gradients_and_activations(jax.device_get(state), batch, run.run_key)
