"""The ledger: scripted fetched metrics -> position, records, rows and stop
reasons, without a device (jaxtrain.train.ledger)."""

import dataclasses
import math

import numpy as np
import pytest

from jaxtrain.train.ledger import Fetched, Position, advance, epoch_row
from jaxtrain.train.stopping import Best, EarlyStopping

SPE = 4  # steps per epoch


def fetched(first, losses, *, epoch_sums=None, finite=None, lr=0.1, seconds=0.5):
  losses = np.asarray(losses, np.float32)
  n = len(losses)
  steps = {"loss": losses, "grad_norm": np.full(n, 2.0, np.float32),
           "finite": np.ones(n, bool) if finite is None else np.asarray(finite, bool),
           "learning_rate": np.full(n, lr, np.float32)}
  return Fetched(first, steps, epoch_sums or {}, seconds)


def val(loss, count=10.0, correct=None):
  sums = {"loss_sum": np.float32(loss * count), "count": np.float32(count)}
  if correct is not None:
    sums["correct"] = np.float32(correct)
  return {"val": sums}


def test_a_call_over_two_and_a_half_epochs():
  losses = np.arange(1, 11, dtype=np.float32)  # steps 1..10
  out = advance(Position(), fetched(0, losses, epoch_sums={0: val(0.5, correct=7.0),
                                                           1: val(0.25)}),
                steps_per_epoch=SPE)
  assert out.steps.tolist() == list(range(1, 11))
  assert [r["epoch"] for r in out.rows] == [1, 2] and [r["step"] for r in out.rows] == [4, 8]
  first, second = out.rows
  assert first["val_loss"] == pytest.approx(0.5) and first["val_accuracy"] == pytest.approx(0.7)
  assert first["train_loss_running"] == np.mean([1, 2, 3, 4])  # the epoch's step losses
  assert second["train_loss_running"] == np.mean([5, 6, 7, 8])
  assert first["learning_rate"] == pytest.approx(0.1)
  assert first["seconds"] == pytest.approx(4 * 0.5)
  position = out.position
  assert (position.epoch, position.batch, position.step(SPE)) == (2, 2, 10)
  assert position.partial["loss"] == [9.0, 10.0]
  assert position.step_records == 10 and position.rows == list(out.rows)
  assert out.reason is None and position.best == Best(value=pytest.approx(0.25), epoch=2)


def test_where_calls_are_cut_does_not_change_the_rows():
  """Calls of 3, 5 and 4 steps give the rows and position of one call of 12."""
  losses = np.linspace(2.0, 0.5, 12, dtype=np.float32)
  sums = {e: val(1.0 / (e + 1)) for e in range(3)}
  whole = advance(Position(), fetched(0, losses, epoch_sums=sums), steps_per_epoch=SPE)
  position, rows = Position(), []
  for first, num in ((0, 3), (3, 5), (8, 4)):
    ended = {e: sums[e] for e in range(first // SPE, (first + num) // SPE)}
    out = advance(position, fetched(first, losses[first:first + num], epoch_sums=ended),
                  steps_per_epoch=SPE)
    position, rows = out.position, rows + list(out.rows)
  assert rows == list(whole.rows)
  assert position == whole.position


def test_nonfinite_stop_cuts_the_records_and_names_the_step():
  losses = [1.0, 0.9, 0.8, 0.7, 0.6, math.nan, 0.4]
  out = advance(Position(), fetched(0, losses, finite=[not math.isnan(x) for x in losses],
                                    epoch_sums={0: val(0.5)}), steps_per_epoch=SPE)
  assert out.steps.tolist() == [1, 2, 3, 4, 5, 6]  # up to and including the bad step
  assert len(out.metrics["loss"]) == 6
  assert out.nonfinite.startswith("non-finite loss or gradient at step 6 (epoch 2, batch 2)")
  assert out.reason == out.nonfinite and out.early_stop is None
  # Epoch 1 ended before the bad step: its row is kept; the run stopped inside
  # epoch 2, and fit saves that position with the reason.
  assert [r["epoch"] for r in out.rows] == [1]
  assert (out.position.epoch, out.position.batch) == (1, 2)
  assert out.position.stop_reason is None


def test_nonfinite_stop_keeps_every_epoch_that_ended_before_it():
  """A call over 2.5 epochs with the bad step in the third kept only the first
  epoch's row (the stop reason cut the loop after one row)."""
  losses = [1.0] * 9 + [math.nan]
  sums = {0: val(0.5), 1: val(0.25)}
  out = advance(Position(), fetched(0, losses, finite=[True] * 9 + [False], epoch_sums=sums),
                steps_per_epoch=SPE)
  assert [r["epoch"] for r in out.rows] == [1, 2]
  assert [r["val_loss"] for r in out.rows] == [0.5, 0.25]
  assert (out.position.epoch, out.position.batch, out.position.step_records) == (2, 2, 10)
  assert out.nonfinite.startswith("non-finite loss or gradient at step 10 (epoch 3, batch 2)")


def test_nonfinite_stop_inside_the_first_epoch_is_left_for_the_driver_to_record():
  out = advance(Position(), fetched(0, [1.0, math.inf], finite=[True, False]),
                steps_per_epoch=SPE)
  assert out.reason and out.rows == ()
  assert out.position.stop_reason is None  # fit saves it with the reason after its loop
  assert (out.position.epoch, out.position.batch) == (0, 2)
  assert out.position.partial["finite"] == [1.0, 0.0]


def test_nonfinite_skip_logs_every_step():
  out = advance(Position(), fetched(0, [1.0, math.nan, 0.5], finite=[True, False, True]),
                steps_per_epoch=SPE, nonfinite="skip")
  assert out.steps.tolist() == [1, 2, 3] and out.reason is None


def test_early_stopping_after_patience_epochs_without_improvement():
  rule = EarlyStopping(monitor="val_loss", patience=2)
  position, reasons = Position(), []
  for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.6, 1.0]):
    out = advance(position, fetched(epoch * SPE, [1.0] * SPE, epoch_sums={epoch: val(loss)}),
                  steps_per_epoch=SPE, rule=rule)
    position = out.position
    reasons.append(out.early_stop)
    if out.reason:
      break
  assert reasons[:3] == [None, None, None]
  assert reasons[3] == ("early stopping after epoch 4: val_loss has not improved for 2 "
                        "epochs; best epoch 2 (val_loss 2)")
  assert position.stop_reason == reasons[3] and position.epoch == 4
  assert position.best.epoch == 2 and position.best.bad_epochs == 2


def test_early_stopping_on_a_maximised_metric_stops_inside_a_long_call():
  """Several epochs in one call: the ledger stops at the first epoch that runs
  out of patience and leaves the rest unlogged."""
  rule = EarlyStopping(monitor="val_accuracy", mode="max", patience=1)
  sums = {e: val(1.0, correct=c) for e, c in enumerate([5.0, 6.0, 6.0, 9.0])}
  out = advance(Position(), fetched(0, [1.0] * 16, epoch_sums=sums), steps_per_epoch=SPE,
                rule=rule)
  assert [r["epoch"] for r in out.rows] == [1, 2, 3]
  assert out.early_stop.startswith("early stopping after epoch 3: val_accuracy")
  assert out.position.epoch == 3 and out.position.best.epoch == 2


def test_position_survives_its_json_form_and_the_input_is_untouched():
  start = Position(epoch=1, batch=2, best=Best(0.5, 1, 0), rows=[{"epoch": 1}],
                   partial={"loss": [1.0, 2.0]}, step_records=6, seconds=1.5)
  before = dataclasses.replace(start, rows=list(start.rows), partial=dict(start.partial))
  out = advance(start, fetched(6, [0.5, 0.25], epoch_sums={1: val(0.75)}),
                steps_per_epoch=SPE)
  assert start == before  # pure: the caller's position is not changed
  assert out.rows[0]["train_loss_running"] == np.mean([1.0, 2.0, 0.5, 0.25])
  assert out.rows[0]["seconds"] == pytest.approx(1.5 + 2 * 0.5)
  assert Position.from_json(out.position.to_json()) == out.position


def test_epoch_row_has_the_metrics_csv_columns():
  row = epoch_row(3, 12, {"train": {"loss_sum": 2.0, "count": 4.0, "correct": 3.0},
                          "val": {"loss_sum": 1.0, "count": 2.0}}, [1.0, 3.0], [0.2, 0.1], 0.5)
  assert row == {"epoch": 3, "step": 12, "train_loss": 0.5, "train_accuracy": 0.75,
                 "val_loss": 0.5, "train_loss_running": 2.0, "learning_rate": 0.1,
                 "seconds": 0.5}
