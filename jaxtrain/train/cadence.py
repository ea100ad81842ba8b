"""When the host must act: one :class:`Cadence` that every periodic concern of a
run answers through, the :class:`Pace` that sizes compiled calls, and the one
agreement per call boundary that makes every process of a run act alike.

A compiled call runs on the device until the host must see the state: a
checkpoint is due, weight histograms are due, early stopping must judge an
epoch, or the run ends. Each such concern is an :class:`Every` (every N steps,
every N epochs, every N seconds); the cadence answers "how many steps until
the host is needed?" (:meth:`Cadence.next_stop`) and "which concerns are due
now?" (:meth:`Cadence.due`). Logging and evaluation every N steps never need
the host: evaluations run inside the program, and a call's metrics are fetched
one call late, while the next call runs.

In a multi-process run the processes' inputs differ (clocks, paces, signals
received, even cadences: process 0 alone has ``histograms``), but what they
do after a boundary must not: the next call's size (its all-reduces), fetching
now (so the ledger's early or non-finite stop comes at the same boundary),
saving (Orbax's barriers), stopping (then no test evaluation). Each process
sends one :class:`Proposal` of fixed fields in one :func:`distributed.agree`
per boundary and acts on the :class:`Boundary` that :func:`decide` makes of
the combined message alone: where the next call ends (the shortest proposal),
the concerns due in any process (:data:`CONCERNS`) and any stop request.
Their other inputs are the same everywhere by construction: step, config, and
the fetched metrics of the global programs that the ledger judges.

A new concern that changes what the processes do must go through it: a name
in :data:`CONCERNS`, its per-process input in :func:`propose`, read by the
driver from the :class:`Boundary`. :meth:`Proposal.values` refuses a concern
the message lacks, and a choice made from one process's clock, pace, signal
or cadence is exactly the one that differs between processes. Local acts
stay local: process 0 draws histograms from a state every process holds.

Callbacks (:mod:`jaxtrain.train.callbacks`) are one concern, ``callbacks``
(an :class:`AnyOf` of each callback's :class:`Every`): a call ends at a
callback's epoch or step only where one is due, and every process calls them
there. What they answer (stop, or a callback raised) comes from each
process's own host code, so it is agreed once more, at those boundaries only
(:func:`jaxtrain.train.callbacks.respond`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jaxtrain.engine import distributed

CALL_SECONDS = 1.0  # the wall time one compiled call aims for
FIRST_CALL_STEPS = 8  # the steps of the first two calls (at most an epoch)
CALL_GROWTH = 8  # a call spans at most this many times the steps of the one before


@dataclasses.dataclass(frozen=True)
class Every:
  """A periodic concern: due every ``steps`` global steps, at the end of every
  ``epochs``-th epoch, and/or once ``seconds`` have passed since it last acted
  (0 turns each off).

  >>> Every(epochs=2).next_after(3, steps_per_epoch=2)
  4
  >>> Every(steps=5).next_after(5, steps_per_epoch=2)
  10
  """

  steps: int = 0
  epochs: int = 0
  seconds: float = 0.0

  def next_after(self, step: int, steps_per_epoch: int) -> int | None:
    """The first global step after ``step`` at which a step or epoch cadence
    falls due (None: only by time, or never)."""
    candidates = []
    if self.steps:
      candidates.append(step + self.steps - step % self.steps)
    if self.epochs:
      epoch = step // steps_per_epoch + 1
      epoch = -(-epoch // self.epochs) * self.epochs
      candidates.append(epoch * steps_per_epoch)
    return min(candidates) if candidates else None

  def due(self, step: int, steps_per_epoch: int, idle_seconds: float = 0.0) -> bool:
    """Whether the concern falls due at the end of global step ``step``."""
    if self.steps and step % self.steps == 0:
      return True
    if self.epochs and step % steps_per_epoch == 0 and (step // steps_per_epoch) % self.epochs == 0:
      return True
    return bool(self.seconds) and idle_seconds >= self.seconds


@dataclasses.dataclass(frozen=True)
class At:
  """A concern due at given global steps (e.g. where a profile starts and ends).

  >>> At((3, 6)).next_after(3, steps_per_epoch=4), At((3, 6)).due(6, 4)
  (6, True)
  """

  steps: tuple[int, ...] = ()

  def next_after(self, step: int, steps_per_epoch: int) -> int | None:
    return min((s for s in self.steps if s > step), default=None)

  def due(self, step: int, steps_per_epoch: int, idle_seconds: float = 0.0) -> bool:
    return step in self.steps


@dataclasses.dataclass(frozen=True)
class AnyOf:
  """A concern due where any of its cadences is (e.g. the callbacks, each on
  its own :class:`Every`): a call ends only where one of them falls due.

  >>> AnyOf((Every(epochs=2), Every(epochs=3))).next_after(4, steps_per_epoch=1)
  6
  """

  cadences: tuple = ()

  def next_after(self, step: int, steps_per_epoch: int) -> int | None:
    stops = [c.next_after(step, steps_per_epoch) for c in self.cadences]
    return min((s for s in stops if s is not None), default=None)

  def due(self, step: int, steps_per_epoch: int, idle_seconds: float = 0.0) -> bool:
    return any(c.due(step, steps_per_epoch, idle_seconds) for c in self.cadences)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Every periodic concern of one run, asked in one place.

  Attributes:
    steps_per_epoch: steps per epoch.
    total_steps: the run's last step ("end" is due there).
    concerns: name -> :class:`Every` (e.g. ``checkpoint``, ``histograms``,
      ``early_stopping``).

  >>> cadence = Cadence(10, 100, {"checkpoint": Every(steps=25),
  ...                             "early_stopping": Every(epochs=1)})
  >>> cadence.next_stop(0), cadence.next_stop(20), cadence.next_stop(95)
  (10, 25, 100)
  >>> sorted(cadence.due(50)), sorted(cadence.due(60)), sorted(cadence.due(100))
  (['checkpoint', 'early_stopping'], ['early_stopping'], ['checkpoint', 'early_stopping', 'end'])
  """

  steps_per_epoch: int
  total_steps: int
  concerns: Mapping[str, Every] = dataclasses.field(default_factory=dict)

  def next_stop(self, step: int) -> int:
    """The first step after ``step`` where the host must act (or the run's end)."""
    stops = [every.next_after(step, self.steps_per_epoch) for every in self.concerns.values()]
    return min([self.total_steps] + [s for s in stops if s is not None])

  def due(self, step: int, idle_seconds: Mapping[str, float] | None = None) -> frozenset[str]:
    """The concerns due at the end of ``step``; ``idle_seconds`` gives, per
    concern, the time since it last acted (for time cadences)."""
    idle = idle_seconds or {}
    due = {name for name, every in self.concerns.items()
           if every.due(step, self.steps_per_epoch, idle.get(name, 0.0))}
    if step >= self.total_steps:
      due.add("end")
    return frozenset(due)


@dataclasses.dataclass(frozen=True)
class Boundary:
  """The end of a call as the host sees it: the concerns due there, a stop
  request (a signal's name) and where the next call ends.

  >>> Boundary().fetch_now, Boundary(signal="SIGTERM").saves(reason=None, recorded=False)
  (False, True)
  """

  due: frozenset[str] = frozenset()
  signal: str | None = None
  next_end: int | None = None  # where the next call ends (agreed), if asked

  @property
  def fetch_now(self) -> bool:
    """Whether the call's results are needed now (else they are fetched one call
    late, while the next call runs)."""
    return bool(self.due) or self.signal is not None

  def saves(self, *, reason: str | None, recorded: bool) -> bool:
    """Whether a checkpoint is written here, once the ledger gave its ``reason``
    to stop (or None); ``recorded``: the position holds that reason (a stop
    inside an epoch is saved with its reason after the loop instead)."""
    wanted = self.signal is not None or bool(self.due & {"checkpoint", "end"}) or bool(reason)
    return wanted and (not reason or recorded)


@dataclasses.dataclass(frozen=True)
class Pace:
  """How many steps one call may span, from measured call times.

  The first two calls run ``FIRST_CALL_STEPS`` steps (at most an epoch): the
  first is mostly compiling, and nothing is known of a step's time before it.
  Then calls grow or shrink to about ``CALL_SECONDS`` of work, so signals and
  time-based saves are seen about that often on any model: whole epochs' worth
  of steps when an epoch takes less, part of an epoch when it takes more;
  growing at most ``CALL_GROWTH`` times from one call to the next, and at most
  an eighth of the run, so the host logs one call while the device
  runs the next rather than everything after the last. The numbers of a run
  never depend on where its calls end.

  >>> pace = Pace().after_call(0.01, steps_per_epoch=10, epochs=80)
  >>> pace = pace.after_call(0.01, steps_per_epoch=10, epochs=80)
  >>> pace.call_steps, pace.limit(13, steps_per_epoch=10, max_steps=1000)
  (60, 73)
  >>> Pace().after_call(1, steps_per_epoch=10, epochs=8).after_call(
  ...     0.3, steps_per_epoch=10, epochs=8).call_steps
  3
  """

  call_steps: int = 0  # 0: not timed yet
  timed: int = 0
  fetched_at: float = 0.0  # clock time the last call's results arrived

  def after_call(self, seconds_per_step: float, *, steps_per_epoch: int, epochs: int,
                 fetched_at: float = 0.0) -> Pace:
    timed = self.timed + 1
    if timed < 2:
      return dataclasses.replace(self, timed=timed, fetched_at=fetched_at)
    steps = int(CALL_SECONDS / max(seconds_per_step, 1e-9))
    # At most CALL_GROWTH times the last call: one bad measurement (two calls'
    # results fetched back to back on a loaded host read as ~0 s a step) must
    # not make a call of minutes; the next measurement corrects it.
    steps = min(steps, (self.call_steps or min(FIRST_CALL_STEPS, steps_per_epoch))
                * CALL_GROWTH)
    if steps >= steps_per_epoch:
      steps = min(steps // steps_per_epoch, -(-epochs // 8)) * steps_per_epoch
    return Pace(max(1, steps), timed, fetched_at)

  def limit(self, step: int, *, steps_per_epoch: int, max_steps: int) -> int:
    """Where a call starting at ``step`` ends at the latest."""
    steps = self.call_steps or min(FIRST_CALL_STEPS, steps_per_epoch)
    return step + min(max_steps, steps)


SAVE_SHARE = 0.05  # the adaptive cadence's target: saving's share of training time
ADAPTIVE_MIN_SECONDS = 5.0  # and the shortest time between its saves
PRIOR_SAVE_SECONDS = 0.1  # a save's cost before one is measured


def save_interval(every_seconds: float, adaptive: bool, save_seconds) -> float:
  """Seconds between time-based saves (``inf``: none by time): ``every_seconds``,
  or with ``adaptive`` 20 times the median of the last saves' costs, at least
  ``ADAPTIVE_MIN_SECONDS`` and at most ``every_seconds``.

  >>> save_interval(300.0, True, []), save_interval(300.0, True, [1.0, 2.0, 1.0])
  (5.0, 20.0)
  """
  if not every_seconds:
    return math.inf
  if not adaptive:
    return every_seconds
  recent = sorted(save_seconds[-5:])
  cost = recent[len(recent) // 2] if recent else PRIOR_SAVE_SECONDS
  return min(every_seconds, max(ADAPTIVE_MIN_SECONDS, cost / SAVE_SHARE))


# A stop request travels as its index here; any other reason as len(SIGNALS).
SIGNALS = (None, "SIGTERM", "SIGINT")
# The concerns the boundary message carries, a flag each ("end": the last step).
CONCERNS = ("checkpoint", "histograms", "early_stopping", "best", "profile", "callbacks",
            "end")
# How processes' proposals combine, per value of Proposal.values: the shortest
# next call, the highest stop code, each concern due where any process has it.
_HOW = ("min", "max") + ("max",) * len(CONCERNS)


@dataclasses.dataclass(frozen=True)
class Proposal:
  """One process's view of a call boundary, as sent to agree on it (combined
  over the processes: the agreed view).

  >>> p = Proposal(40, 1, frozenset({"checkpoint"}))
  >>> Proposal.from_values(p.values()) == p
  True
  """

  next_end: int  # where the next call would end (cadence, capped by the pace)
  signal: int = 0  # the stop request's code (0: none; see SIGNALS)
  due: frozenset[str] = frozenset()  # concerns due here, by cadence and clock

  def values(self) -> list[int]:
    unknown = sorted(self.due - set(CONCERNS))
    if unknown:
      raise ValueError(f"concerns {unknown} are not in the boundary message: add them "
                       "to jaxtrain.train.cadence.CONCERNS")
    return [self.next_end, self.signal] + [int(name in self.due) for name in CONCERNS]

  @classmethod
  def from_values(cls, values) -> Proposal:
    next_end, signal, *flags = (int(v) for v in values)
    return cls(next_end, signal, frozenset(n for n, f in zip(CONCERNS, flags, strict=True) if f))


def _code(signal: str | None) -> int:
  return SIGNALS.index(signal) if signal in SIGNALS else len(SIGNALS)


def propose(cadence: Cadence, end: int, *, seconds_since_save: float | None = None,
            save_interval: float | None = None, signal: str | None = None,
            pace: Pace | None = None, max_steps: int | None = None,
            start: bool = False) -> Proposal:
  """This process's proposal at step ``end``, from its clock
  (``seconds_since_save``, None without a checkpointer; ``save_interval``: its
  adaptive time between saves), its stop request and its ``pace`` (None: the
  next call ends at the cadence's next stop). ``start``: the boundary before
  the first call, where nothing is due.

  >>> cadence = Cadence(10, 100, {"checkpoint": Every(seconds=300.0)})
  >>> propose(cadence, 20, seconds_since_save=6.0, save_interval=5.0, signal="SIGINT")
  Proposal(next_end=100, signal=2, due=frozenset({'checkpoint'}))
  """
  due = frozenset()
  if not start:
    due = cadence.due(end, None if seconds_since_save is None
                      else {"checkpoint": seconds_since_save})
    if (cadence.concerns.get("checkpoint", Every()).seconds and save_interval is not None
        and seconds_since_save is not None and seconds_since_save >= save_interval):
      due |= {"checkpoint"}  # the adaptive cadence's time has come
  next_end = cadence.next_stop(end)
  if pace is not None:
    next_end = min(next_end, pace.limit(end, steps_per_epoch=cadence.steps_per_epoch,
                                        max_steps=max_steps or cadence.total_steps))
  return Proposal(next_end, _code(signal), due)


def combine_proposals(proposals) -> Proposal:
  """The agreed proposal from every process's, as :func:`agreed_boundary`
  combines the gathered messages."""
  return Proposal.from_values(distributed.combine([p.values() for p in proposals], _HOW))


def decide(agreed: Proposal, local_signal: str | None = None) -> Boundary:
  """The boundary from the agreed proposal alone. A stop takes this process's
  own reason as its name where that has the agreed code (a name only: whether
  to stop is agreed)."""
  signal = None
  if agreed.signal:
    signal = local_signal if _code(local_signal) == agreed.signal else (
        SIGNALS[agreed.signal] if agreed.signal < len(SIGNALS) else "a stop request")
  return Boundary(agreed.due, signal, agreed.next_end)


def agreed_boundary(cadence: Cadence, end: int, checkpointer, should_stop, *,
                    pace: Pace | None = None, max_steps: int | None = None,
                    start: bool = False) -> Boundary:
  """The boundary at step ``end``, the same in every process of a run, from
  one agreement (one all-gather; free in one process): a concern due in any
  process (a save due by its clock, process 0's histograms) is due in all, a
  stop request received by any stops all, and the next call ends at the
  shortest proposal (by ``pace``; without it, at the cadence's next stop)."""
  seconds = interval = None
  if checkpointer is not None and not start:
    seconds = checkpointer.seconds_since_save()
    if hasattr(checkpointer, "save_interval"):
      interval = checkpointer.save_interval()
  signal = should_stop() if should_stop else None
  local = propose(cadence, end, seconds_since_save=seconds, save_interval=interval,
                  signal=signal, pace=pace, max_steps=max_steps, start=start)
  agreed = distributed.agree(local.values(), _HOW, name="boundary")
  return decide(Proposal.from_values(agreed), signal)


def agreed_start(cadence: Cadence, first: int, should_stop, *, pace: Pace,
                 max_steps: int | None = None) -> Boundary:
  """The boundary before the first call (at step ``first``): a stop request
  received during start-up by any process, and where the first call ends."""
  return agreed_boundary(cadence, first, None, should_stop, pace=pace,
                         max_steps=max_steps, start=True)
