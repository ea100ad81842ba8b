"""The processes' agreement at call boundaries (jaxtrain.engine.distributed.agree,
jaxtrain.train.cadence.agreed_boundary), without jax.distributed: the encoding
and the combine rule as pure functions, and the agreement itself between
threads standing in for processes (a fake all-gather)."""

from __future__ import annotations

import dataclasses
import math
import threading

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from jaxtrain.engine import distributed
from jaxtrain.train.cadence import (
  CONCERNS,
  SIGNALS,
  Boundary,
  Cadence,
  Every,
  Pace,
  Proposal,
  agreed_boundary,
  agreed_start,
  combine_proposals,
  decide,
  propose,
)

SPE = 10
# Values a process may send that 32 bits cannot hold, and some that float32
# rounds: each must come back bit for bit.
AWKWARD = [1e18, 2.0 ** 40, 2 ** 40 + 1, -(2 ** 53), 0.1, 2.5, -0.0, 3.2e-310,
           math.inf, -math.inf, 2 ** 31, -(2 ** 31) - 1]


# -- the encoding --------------------------------------------------------------------

def test_every_float64_round_trips_bit_for_bit():
  words = distributed.encode(AWKWARD + [math.nan], tag=5)
  tag, values = distributed.decode(words)
  assert int(tag) == 5
  sent = np.asarray(AWKWARD + [math.nan], np.float64)
  assert values.view(np.uint64).tolist() == sent.view(np.uint64).tolist()


@pytest.mark.parametrize("values", [[1, 2, 3], [1e18, 0, 1], [2.5, 0.1, 7], [2 ** 40, 1, 0]])
def test_the_message_s_form_never_depends_on_its_values(values):
  """Whole numbers, overflowing ones and fractions: the same dtype and length
  (the bug: int32 from one process, float32 from another)."""
  words = distributed.encode(values)
  assert words.dtype == np.int32 and words.shape == (1 + 2 * len(values),)


def test_integers_past_float64_s_exact_range_are_refused():
  with pytest.raises(ValueError, match="2\\*\\*53"):
    distributed.encode([2 ** 53 + 1])


def test_a_stack_of_messages_decodes_row_by_row():
  rows = [[1e18, 3], [2.5, 2 ** 40]]
  tags, values = distributed.decode(np.stack([distributed.encode(r, tag=9) for r in rows]))
  assert tags.tolist() == [9, 9] and values.tolist() == [[1e18, 3.0], [2.5, 2.0 ** 40]]


def test_the_combine_rule_is_per_value():
  rows = [[40, 0, 1e18], [35, 2, 2.5], [50, 1, 0]]
  assert distributed.combine(rows, ("min", "max", "max")) == [35.0, 2.0, 1e18]
  assert distributed.combine(rows, "min") == [35.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="per value"):
    distributed.combine(rows, ("min", "max"))


# -- the boundary message, as pure functions -------------------------------------------

def test_every_concern_a_run_can_have_travels_in_the_message():
  from jaxtrain.rundir.checkpointer import CheckpointConfig
  from jaxtrain.train.config import FitConfig, plan_cadence
  from jaxtrain.train.stopping import EarlyStopping

  @dataclasses.dataclass
  class Checkpointing:
    config: object

  class Monitor:
    def log_histograms(self, *args):
      pass

  config = FitConfig(epochs=4, batch_size=8, histogram_every=1, profile_steps=(1, 3),
                     early_stopping=EarlyStopping(monitor="train_loss"))
  cadence = plan_cadence(config, SPE, Checkpointing(CheckpointConfig()), Monitor(),
                         every_epoch=True)
  assert set(cadence.concerns) | {"end"} <= set(CONCERNS)
  with pytest.raises(ValueError, match="not in the boundary message"):
    Proposal(10, 0, frozenset({"evaluate"})).values()


def proposals_of_a_race():
  """Two processes at step 40 (an epoch end) that disagree on everything they
  propose: process 0's adaptive save is due by its clock (the 1e18 of old)
  and it alone draws histograms; process 1 paces shorter calls and got SIGTERM."""
  histograms = Every(epochs=4)
  checkpoint = Every(epochs=15, seconds=300.0)
  cadences = [Cadence(SPE, 2000, {"checkpoint": checkpoint, "histograms": histograms}),
              Cadence(SPE, 2000, {"checkpoint": checkpoint})]
  paces = [Pace(call_steps=120, timed=3), Pace(call_steps=30, timed=3)]
  clocks = [(1e18, 5.0), (3.2, 20.0)]  # (seconds since the last save, save interval)
  signals = [None, "SIGTERM"]
  return [propose(c, 40, seconds_since_save=s, save_interval=i, signal=g, pace=p,
                  max_steps=4096)
          for c, p, (s, i), g in zip(cadences, paces, clocks, signals, strict=True)]


def test_disagreeing_processes_decide_alike():
  ours, theirs = proposals_of_a_race()
  assert ours.due == {"checkpoint", "histograms"} and theirs.due == frozenset()
  assert (ours.next_end, theirs.next_end) == (80, 70)  # histograms at 80; a 30-step pace
  # What each process receives: every process's words, gathered.
  gathered = np.stack([distributed.encode(p.values()) for p in (ours, theirs)])
  decided = []
  for local_signal in (None, "SIGTERM"):  # each process decodes the same words
    _, rows = distributed.decode(gathered.copy())
    received = [Proposal.from_values(row) for row in rows]
    assert received == [ours, theirs]  # exactly as sent
    decided.append(decide(combine_proposals(received), local_signal))
  assert decided[0] == decided[1] == Boundary(frozenset({"checkpoint", "histograms"}),
                                              "SIGTERM", 70)
  for boundary in decided:
    assert boundary.fetch_now and boundary.saves(reason=None, recorded=False)


def test_a_save_due_on_one_clock_saves_everywhere_and_none_is_due_on_none():
  cadence = Cadence(SPE, 2000, {"checkpoint": Every(seconds=300.0)})
  due = propose(cadence, 13, seconds_since_save=2.0 ** 40, save_interval=5.0)
  quiet = propose(cadence, 13, seconds_since_save=4.9, save_interval=5.0)
  assert combine_proposals([quiet, due]).due == {"checkpoint"}
  assert combine_proposals([quiet, quiet]).due == frozenset()
  # Without an adaptive interval, every_seconds decides.
  assert propose(cadence, 13, seconds_since_save=300.0).due == {"checkpoint"}


def test_a_stop_request_keeps_its_name_where_it_is_the_agreed_one():
  other = len(SIGNALS)  # the code of a reason other than a signal
  agreed = combine_proposals([Proposal(8, other), Proposal(8)])
  assert decide(agreed, "preempted").signal == "preempted"  # one process: its own reason
  assert decide(agreed, None).signal == "a stop request"
  both = combine_proposals([Proposal(8, 1), Proposal(8, 2)])
  assert decide(both, "SIGTERM").signal == decide(both, "SIGINT").signal == "SIGINT"


# -- the agreement itself, threads for processes -------------------------------------

class Processes:
  """Runs one function per rank in threads whose ``agree`` all-gathers
  through a barrier, as ``process_allgather`` does between processes."""

  def __init__(self, monkeypatch, count: int = 2):
    self.count, self.local = count, threading.local()
    self.barrier = threading.Barrier(count, timeout=20)
    self.sent = [None] * count
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(multihost_utils, "process_allgather", self.allgather)

  def allgather(self, words):
    self.sent[self.local.rank] = np.asarray(words).copy()
    self.barrier.wait()
    gathered = np.stack(self.sent)
    self.barrier.wait()  # all have read before the next agreement writes
    return gathered

  def run(self, *per_rank):
    results, errors = [None] * self.count, []

    def main(rank):
      self.local.rank = rank
      try:
        results[rank] = per_rank[rank]()
      except BaseException as error:  # noqa: BLE001 - reported below
        errors.append(error)
        self.barrier.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(self.count)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    if errors:
      raise errors[0]
    return results


class Clock:
  """A checkpointer's clock as the boundary reads it."""

  def __init__(self, idle: float, interval: float):
    self.idle, self.interval = idle, interval

  def seconds_since_save(self) -> float:
    return self.idle

  def save_interval(self) -> float:
    return self.interval


def test_agreed_boundary_is_the_same_in_every_process(monkeypatch):
  processes = Processes(monkeypatch)
  checkpoint = Every(epochs=15, seconds=300.0)
  ranks = [
      (Cadence(SPE, 2000, {"checkpoint": checkpoint, "histograms": Every(epochs=4)}),
       Clock(1e18, 5.0), lambda: None, Pace(call_steps=120, timed=3)),
      (Cadence(SPE, 2000, {"checkpoint": checkpoint}),
       Clock(2.0 ** 40 + 0.5, 1e18), lambda: "SIGTERM", Pace(call_steps=30, timed=3)),
  ]
  boundaries = processes.run(*[
      (lambda c=c, k=k, s=s, p=p: agreed_boundary(c, 40, k, s, pace=p, max_steps=4096))
      for c, k, s, p in ranks])
  assert boundaries[0] == boundaries[1] == Boundary(
      frozenset({"checkpoint", "histograms"}), "SIGTERM", 70)


def test_the_call_size_agreement_takes_the_shortest_exactly(monkeypatch):
  processes = Processes(monkeypatch)
  ends = processes.run(lambda: distributed.agree([2 ** 40 + 1], "min"),
                       lambda: distributed.agree([2 ** 40 + 3], "min"))
  assert ends == [[2.0 ** 40 + 1]] * 2
  mixed = processes.run(lambda: distributed.agree([1e18, 3], "max"),
                        lambda: distributed.agree([2.5, 4], "max"))
  assert mixed == [[1e18, 4.0]] * 2


def test_processes_at_different_agreements_raise(monkeypatch):
  processes = Processes(monkeypatch)
  with pytest.raises(RuntimeError, match="different agreements"):
    processes.run(lambda: distributed.agree([1, 2], "max", name="boundary"),
                  lambda: distributed.agree([1, 2], "max", name="other"))


def test_the_start_agrees_on_a_signal_and_the_first_call_only(monkeypatch):
  processes = Processes(monkeypatch)
  cadence = Cadence(SPE, 200, {"early_stopping": Every(epochs=1)})
  starts = processes.run(lambda: agreed_start(cadence, 20, lambda: None, pace=Pace()),
                         lambda: agreed_start(cadence, 20, lambda: "SIGINT", pace=Pace()))
  # Step 20 is an epoch end, but nothing is due before the first call.
  assert starts[0] == starts[1] == Boundary(frozenset(), "SIGINT", 28)


def test_one_process_agrees_with_itself():
  cadence = Cadence(SPE, 100, {"checkpoint": Every(steps=25)})
  assert agreed_boundary(cadence, 25, Clock(1.0, 5.0), None) == Boundary(
      frozenset({"checkpoint"}), None, 50)
  assert distributed.agree([1e18, 2.5], ("max", "min")) == [1e18, 2.5]
