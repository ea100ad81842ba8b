"""When the host must act (jaxtrain.train.cadence), without a device."""

import itertools

import pytest

from jaxtrain.train.cadence import (
  CALL_GROWTH,
  CALL_SECONDS,
  FIRST_CALL_STEPS,
  Boundary,
  Cadence,
  Every,
  Pace,
)

SPE = 10


def test_a_mid_epoch_checkpoint_boundary_ends_a_call():
  cadence = Cadence(SPE, 100, {"checkpoint": Every(steps=15)})
  assert [cadence.next_stop(s) for s in (0, 14, 15, 29, 90)] == [15, 15, 30, 30, 100]
  assert cadence.due(15) == {"checkpoint"}
  assert cadence.due(20) == set()  # an epoch end no concern asks for
  assert cadence.due(100) == {"end"}


def test_epoch_concerns_fall_due_at_their_epoch_ends():
  cadence = Cadence(SPE, 200, {"histograms": Every(epochs=5),
                               "early_stopping": Every(epochs=1)})
  assert cadence.next_stop(0) == 10 and cadence.next_stop(13) == 20
  assert cadence.due(50) == {"histograms", "early_stopping"}
  assert cadence.due(40) == {"early_stopping"}
  assert cadence.due(45) == set()


def test_time_cadence_is_due_only_once_its_seconds_have_passed():
  cadence = Cadence(SPE, 100, {"checkpoint": Every(seconds=300.0)})
  assert cadence.next_stop(0) == 100  # time never cuts a call
  assert cadence.due(7, {"checkpoint": 299.9}) == set()
  assert cadence.due(7, {"checkpoint": 300.0}) == {"checkpoint"}


@pytest.mark.parametrize("steps,epochs,other", [(7, 0, 3), (0, 2, 0), (25, 3, 4), (3, 1, 0)])
def test_every_step_a_concern_is_due_at_is_a_call_end(steps, epochs, other):
  """Plan a whole run as fit does (calls also capped at a few steps) and check
  no step where a concern is due falls inside a call."""
  cadence = Cadence(SPE, 137, {"checkpoint": Every(steps=steps, epochs=epochs),
                               "histograms": Every(epochs=other)})
  ends, first = [], 0
  while first < 137:
    first = min(cadence.next_stop(first), first + 23)
    ends.append(first)
  due = [s for s in range(1, 138) if cadence.due(s)]
  assert set(due) <= set(ends), sorted(set(due) - set(ends))
  assert ends[-1] == 137


def test_a_signal_fetches_now_and_saves():
  signal = Boundary(frozenset(), "SIGTERM")
  assert signal.fetch_now and signal.saves(reason=None, recorded=False)


def test_nothing_due_fetches_one_call_late_and_saves_nothing():
  quiet = Boundary()
  assert not quiet.fetch_now and not quiet.saves(reason=None, recorded=False)
  histograms = Boundary(frozenset({"histograms"}))
  assert histograms.fetch_now and not histograms.saves(reason=None, recorded=False)


@pytest.mark.parametrize("due", [{"checkpoint"}, {"end"}, {"checkpoint", "early_stopping"}])
def test_checkpoint_and_run_end_save(due):
  assert Boundary(frozenset(due)).saves(reason=None, recorded=False)


def test_a_stop_saves_only_once_the_position_records_it():
  early = Boundary(frozenset({"early_stopping"}))
  assert early.saves(reason="early stopping after epoch 4", recorded=True)
  # A non-finite stop inside an epoch is saved with its reason after the loop.
  assert not early.saves(reason="non-finite loss", recorded=False)


def test_pace_grows_calls_to_about_a_second_after_the_first_timed_call():
  pace = Pace()
  assert pace.limit(0, steps_per_epoch=SPE, max_steps=4096) == FIRST_CALL_STEPS  # untimed
  pace = pace.after_call(10.0, steps_per_epoch=SPE, epochs=800)  # compiling: ignored
  assert pace.call_steps == 0
  pace = pace.after_call(0.001, steps_per_epoch=SPE, epochs=800)
  # A second's worth is 100 epochs; a call grows at most 8x: 64 steps, 6 epochs.
  assert int(CALL_SECONDS / (0.001 * SPE)) == 100
  assert pace.call_steps == (FIRST_CALL_STEPS * CALL_GROWTH // SPE) * SPE == 6 * SPE
  for _ in range(2):
    pace = pace.after_call(0.001, steps_per_epoch=SPE, epochs=800)
  assert pace.call_steps == 100 * SPE  # 60 -> 480 -> 1000 steps
  assert pace.limit(30, steps_per_epoch=SPE, max_steps=4096) == 30 + 100 * SPE
  assert pace.limit(30, steps_per_epoch=SPE, max_steps=64) == 94


def test_one_near_zero_measurement_grows_a_call_8x_not_to_the_whole_span():
  # Two calls' results fetched back to back read as ~0 s a step.
  pace = Pace(call_steps=40, timed=2).after_call(1e-9, steps_per_epoch=100, epochs=1000)
  assert pace.call_steps == 300  # 320 steps capped, floored to 3 whole epochs


def test_pace_splits_an_epoch_longer_than_a_call():
  # A wide model: 0.25 s a step, 100 steps an epoch: calls of 4 steps, not 25 s.
  pace = Pace().after_call(5.0, steps_per_epoch=100, epochs=8)
  pace = pace.after_call(0.25, steps_per_epoch=100, epochs=8)
  assert pace.call_steps == 4
  assert pace.limit(97, steps_per_epoch=100, max_steps=4096) == 101  # across an epoch end
  slow = pace.after_call(3.0, steps_per_epoch=100, epochs=8)  # slower than a call
  assert slow.call_steps == 1


@pytest.mark.parametrize("seconds,epochs,expected", [(1e-6, 80, 10), (1.0, 80, 1)])
def test_pace_is_capped_at_an_eighth_of_the_run(seconds, epochs, expected):
  pace = Pace()
  for _ in itertools.repeat(None, 3):
    pace = pace.after_call(seconds / SPE, steps_per_epoch=SPE, epochs=epochs)
  assert pace.call_steps == expected * SPE
