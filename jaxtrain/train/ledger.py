"""The run's bookkeeping as a pure function: what a call's fetched metrics do
to the run's position, which epoch rows they complete, and whether the run must
stop.

``fit`` dispatches compiled calls and fetches their metrics; everything it then
decides about them lives here, on numpy values and without a device:
:func:`advance` takes the :class:`Position` before a call and the call's
:class:`Fetched` metrics and returns an :class:`Advance`: the new position, the
per-step records to log, the finished epochs' rows and a stop reason. The
position is checkpointed with the state, so a resumed run continues the very
same ledger.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtrain.core.metrics import means
from jaxtrain.train.stopping import Best, EarlyStopping, Ranking


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run stands; checkpointed with the state so a resume is exact.

  Attributes:
    epoch: epochs completed.
    batch: batches done in the current (incomplete) epoch.
    best: the early-stopping / best-epoch record.
    rows: the epoch rows written so far (metrics.csv); ``fit`` keeps only the
      latest (the others are in its history, metrics.csv and the checkpoints'
      log segments).
    partial: the current epoch's per-step metrics so far.
    step_records: per-step records logged so far (steps.jsonl lines).
    stop_reason: why the run ended early, if it did.
    seconds: wall time spent on the current epoch so far.
  """

  epoch: int = 0
  batch: int = 0
  best: Best = dataclasses.field(default_factory=Best)
  rows: list = dataclasses.field(default_factory=list)
  partial: dict = dataclasses.field(default_factory=dict)
  step_records: int = 0
  stop_reason: str | None = None
  seconds: float = 0.0

  @classmethod
  def at(cls, step: int, steps_per_epoch: int) -> Position:
    """A run that has done ``step`` updates and logged nothing yet (a state
    trained before, continued by ``fit``).

    >>> Position.at(10, 4)
    Position(epoch=2, batch=2, best=Best(value=nan, epoch=0, bad_epochs=0), rows=[], partial={}, step_records=0, stop_reason=None, seconds=0.0)
    """
    epoch, batch = divmod(step, steps_per_epoch)
    return cls(epoch=epoch, batch=batch)

  def step(self, steps_per_epoch: int) -> int:
    """The global step the run is at (updates done)."""
    return self.epoch * steps_per_epoch + self.batch

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> Position:
    return cls(**{**record, "best": Best(**record["best"])})


@dataclasses.dataclass(frozen=True)
class StepLog:
  """``steps.jsonl`` as a resumed checkpoint counts it, so that the resumed run
  makes the file hold exactly those lines whatever became of it. Used as an int
  it is the number of records (``step_records``).

  A checkpoint records the lines' SHA-256 (``sha256``), and the lines are in the
  segments of ``folder`` (:mod:`jaxtrain.train.logstore`). Checkpoints written
  before held the lines themselves, in zlib-compressed base64 ``chunks``:

  >>> log = StepLog(2, (StepLog.chunk(['{"step": 1}\\n', '{"step": 2}\\n']),))
  >>> int(log), log.text()
  (2, '{"step": 1}\\n{"step": 2}\\n')
  """

  count: int
  chunks: tuple[str, ...] = ()
  sha256: str | None = None
  folder: str | None = None

  def __index__(self) -> int:
    return self.count

  @staticmethod
  def chunk(lines) -> str:
    return base64.b64encode(zlib.compress("".join(lines).encode(), 6)).decode("ascii")

  def text(self) -> str:
    return "".join(zlib.decompress(base64.b64decode(c)).decode() for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class Fetched:
  """One call's results on the host.

  Attributes:
    first: the global step before the call's first step.
    steps: per-step metrics, ``{name: [steps trained]}`` (``loss``, ``finite``,
      ``learning_rate``, ...).
    epoch_sums: ``{epoch (0-based): {set: sums}}`` for the epochs that ended.
    seconds_per_step: the call's measured wall time per step.
  """

  first: int
  steps: Mapping[str, np.ndarray]
  epoch_sums: Mapping[int, Mapping[str, Mapping[str, Any]]]
  seconds_per_step: float = 0.0


@dataclasses.dataclass(frozen=True)
class Advance:
  """What a call did to the run (see :func:`advance`).

  Attributes:
    position: the position after the call.
    steps: global step numbers (1-based) of the per-step records to log.
    metrics: their per-step metrics (cut after a non-finite step under
      ``nonfinite="stop"``).
    rows: the epoch rows the call completed, in order.
    nonfinite: the message of a non-finite stop, or None.
    early_stop: the message of an early stop, or None.
  """

  position: Position
  steps: np.ndarray
  metrics: dict[str, np.ndarray]
  rows: tuple[dict, ...] = ()
  nonfinite: str | None = None
  early_stop: str | None = None

  @property
  def reason(self) -> str | None:
    """Why the run must stop after this call, or None."""
    return self.nonfinite or self.early_stop


def set_means(sums: Mapping[str, Mapping], names=None) -> dict[str, float]:
  """``{"<set>_<metric>": mean}`` of evaluation sums per set (``names``: which
  sets, in order; default all).

  >>> set_means({"val": {"loss_sum": 3.0, "count": 2.0, "correct": 1.0}})
  {'val_loss': 1.5, 'val_accuracy': 0.5}
  """
  return {f"{split}_{name}": float(value)
          for split in (sums if names is None else [n for n in names if n in sums])
          for name, value in means(sums[split]).items()}


def epoch_row(epoch: int, step: int, sums: Mapping[str, Mapping], loss, learning_rate,
              seconds: float, penalty=None) -> dict[str, Any]:
  """A metrics.csv row: the epoch sets' means, the epoch's mean training loss
  (``train_loss_running``), mean penalty term (``train_penalty``, when
  ``penalty`` is given) and its last learning rate.

  >>> epoch_row(1, 2, {"val": {"loss_sum": 3.0, "count": 2.0}}, [1.0, 0.5], [0.1, 0.1], 0.25)
  {'epoch': 1, 'step': 2, 'val_loss': 1.5, 'train_loss_running': 0.75, 'learning_rate': 0.1, 'seconds': 0.25}
  """
  row = {"epoch": epoch, "step": step,
         **set_means(sums, ("train", "val", "train_ema", "val_ema"))}
  row["train_loss_running"] = float(np.mean(np.asarray(loss, np.float64), dtype=np.float64))
  if penalty is not None:
    row["train_penalty"] = float(np.mean(np.asarray(penalty, np.float64), dtype=np.float64))
  row["learning_rate"] = float(np.asarray(learning_rate)[-1])
  row["seconds"] = seconds
  return row


def _cut_at_nonfinite(fetched: Fetched, steps_per_epoch: int, nonfinite: str):
  """The call's step numbers and metrics, ending at the first non-finite step
  under ``"stop"``, and that stop's message."""
  metrics = dict(fetched.steps)
  steps = np.arange(fetched.first + 1, fetched.first + 1 + len(metrics["loss"]))
  bad = np.flatnonzero(~np.asarray(metrics["finite"], bool))
  if not bad.size or nonfinite != "stop":
    return steps, metrics, None
  index = int(bad[0])
  epoch, batch = divmod(int(steps[index]) - 1, steps_per_epoch)
  message = (f"non-finite loss or gradient at step {steps[index]} (epoch {epoch + 1}, batch "
             f"{batch + 1}): stopped; the state is the one before that step")
  return steps[: index + 1], {k: v[: index + 1] for k, v in metrics.items()}, message


def advance(position: Position, fetched: Fetched, *, steps_per_epoch: int,
            nonfinite: str = "stop", rule: EarlyStopping | None = None,
            ranking: Ranking | None = None) -> Advance:
  """The run after one call: pure, on host values.

  Args:
    position: where the run stood before the call (``fetched.first`` is its step).
    fetched: the call's metrics.
    steps_per_epoch: steps per epoch.
    nonfinite: ``"stop"`` ends the records at the first non-finite step and
      stops the run; ``"skip"`` logs them all.
    rule: early stopping, or None.
    ranking: how the best epoch is named (default: the rule's, else ``val_loss``).

  Returns:
    An :class:`Advance`.

  >>> fetched = Fetched(0, {"loss": np.array([1.0, 0.5, 0.25]), "finite": np.ones(3, bool),
  ...                       "learning_rate": np.full(3, 0.1)},
  ...                   {0: {"val": {"loss_sum": 1.0, "count": 4.0}}})
  >>> out = advance(Position(), fetched, steps_per_epoch=2)
  >>> out.position.epoch, out.position.batch, [r["val_loss"] for r in out.rows]
  (1, 1, [0.25])
  """
  spe = steps_per_epoch
  ranking = ranking or (rule.ranking if rule else Ranking())
  steps, metrics, message = _cut_at_nonfinite(fetched, spe, nonfinite)
  position = dataclasses.replace(position, step_records=position.step_records + len(steps))
  early_stop, rows = None, []
  first, stop = fetched.first, fetched.first + len(steps)
  while position.step(spe) < stop:
    at, epoch = position.step(spe), position.epoch
    upto = min(stop, (epoch + 1) * spe)
    seconds = position.seconds + fetched.seconds_per_step * (upto - at)

    def so_far(key):  # this epoch's values of a per-step metric, in order
      return np.concatenate([np.asarray(position.partial.get(key, []), np.float64),
                             np.asarray(metrics[key][at - first: upto - first], np.float64)])

    if upto < (epoch + 1) * spe or (message and upto == stop):
      # The epoch goes on in the next call (or a non-finite step stopped the
      # run inside it; fit records that reason with this position).
      position = dataclasses.replace(position, batch=upto - epoch * spe, seconds=seconds,
                                     partial={k: so_far(k).tolist() for k in metrics})
      break
    row = epoch_row(epoch + 1, upto, fetched.epoch_sums.get(epoch, {}), so_far("loss"),
                    so_far("learning_rate"), seconds,
                    so_far("penalty") if "penalty" in metrics else None)
    rows.append(row)
    best = position.best.update(row.get(ranking.monitor, math.nan), epoch + 1, ranking)
    if best.should_stop(rule):
      early_stop = (
          f"early stopping after epoch {epoch + 1}: {rule.monitor} has not improved "
          f"for {rule.patience} epochs; best epoch {best.epoch} "
          f"({rule.monitor} {best.value:.6g})")
    position = dataclasses.replace(position, epoch=epoch + 1, batch=0, best=best,
                                   rows=position.rows + [row], partial={}, seconds=0.0,
                                   stop_reason=early_stop)
    if early_stop:
      break
  return Advance(position, steps, metrics, tuple(rows), message, early_stop)


def extend_rows(table: dict[str, list], row: Mapping[str, Any]) -> None:
  """Appends one epoch ``row`` to ``table`` so that every column keeps one value
  per row: a column the row lacks gets NaN, and a column first seen in it gets
  NaN for the rows before (a history is never ragged).

  >>> table = {}
  >>> extend_rows(table, {"epoch": 1, "loss": 0.5})
  >>> extend_rows(table, {"epoch": 2, "accuracy": 0.75})
  >>> table
  {'epoch': [1, 2], 'loss': [0.5, nan], 'accuracy': [nan, 0.75]}
  """
  rows = max((len(c) for c in table.values()), default=0)
  for key, value in row.items():
    if key not in table:  # (not setdefault: its default would be built for every key)
      table[key] = [math.nan] * rows
    table[key].append(value)
  for column in table.values():
    if len(column) == rows:
      column.append(math.nan)
