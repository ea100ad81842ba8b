"""Trains a sweep's members: groups in one vmapped program, the rest one by one.

Each member runs through its experiment's own ``main``: ``jaxtrain.run.run``
calls made there are collected (for a vmapped group, trained by
:func:`jaxtrain.rundir.group.run_group`) or run and observed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class _Collected(Exception):
  def __init__(self, call):
    super().__init__("collected")
    self.call = call


def collect(main: Callable, config):
  """The ``run`` call ``main(config)`` makes first (not trained), or None."""
  from jaxtrain.rundir.run import intercepted

  def handler(call):
    raise _Collected(call)

  try:
    with intercepted(handler):
      main(config)
  except _Collected as collected:
    return collected.call
  return None


def observe(main: Callable, config) -> list:
  """Runs ``main(config)``; the results of the ``run`` calls it made, in order."""
  from jaxtrain.rundir.run import intercepted, run_call

  seen = []

  def handler(call):
    seen.append(run_call(call))
    return seen[-1]

  with intercepted(handler):
    main(config)
  return seen


def check(main: Callable, sweep: Sequence) -> dict:
  """Every member's ``run`` call, checked as ``run`` would check it, before
  anything is written: ``{name: RunCall}``; a ValueError names the member."""
  from jaxtrain.data.indexed import length
  from jaxtrain.rundir.record import check_record
  from jaxtrain.rundir.run import check_workdir
  from jaxtrain.train.config import validate

  calls = {}
  for member in sweep:
    try:
      call = collect(main, member.config)
      if call is not None:
        validate(call.config, length(call.train))
        check_record(call.full_record())
        check_workdir(call.workdir, call.full_record(), overwrite=call.overwrite)
    except (ValueError, FileNotFoundError) as error:
      raise type(error)(f"sweep member {member.name}: {str(error).splitlines()[0]}") from None
    calls[member.name] = call
  return calls


def _interrupted(result) -> bool:
  return result is None or (result.stop_reason or "").startswith("interrupted")


def train(groups: Sequence[Sequence], main: Callable, calls: dict) -> dict | None:
  """``{member name: (FitResult, how)}`` (how it trained now: ``"vmapped"``,
  ``"alone"`` or ``"resumed"``), or None when a signal
  stopped the sweep (it says so; the rerun resumes). ``calls``: :func:`check`'s."""
  from jaxtrain.rundir.group import run_group, vmap_problem
  from jaxtrain.rundir.run import stop_on_signals

  results = {}
  total = sum(len(g) for g in groups)
  with stop_on_signals() as should_stop:
    for group in groups:
      # A group trains in one program from scratch; members with checkpoints
      # (a finished group, or one extended by --epochs) resume one by one.
      fresh = all(not (m.config.workdir / "checkpoints").exists() for m in group)
      if len(group) > 1 and fresh:
        group_calls = [calls[m.name] for m in group]
        problem = (vmap_problem(group_calls) if all(c is not None for c in group_calls)
                   else "the experiment trains them otherwise")
        if problem is None:
          print(f"sweep: members {', '.join(m.name[:2] for m in group)} train in one "
                f"vmapped program")
          out = run_group(group_calls, should_stop=should_stop)
          if out is None:
            print(f"sweep: stopped by {should_stop()} after {len(results)} of {total} "
                  "members (the vmapped group trains again); run the same command to "
                  "resume")
            return None
          for member, result in zip(group, out):
            how = "vmapped"
            if (result.stop_reason or "").startswith("non-finite"):
              # Its solo run keeps the state before the bad step: train it so.
              from jaxtrain.rundir.run import clear_run

              print(f"sweep: member {member.name} diverged in the vmapped program; "
                    "it trains alone for its checkpoint")
              clear_run(member.config.workdir)
              result, how = (observe(main, member.config) or [None])[-1], "alone"
            results[member.name] = (result, how)
          continue
        print(f"sweep: members {', '.join(m.name[:2] for m in group)} train one by one: "
              f"{problem}")
      for member in group:
        signal = should_stop()
        resumed = (member.config.workdir / "checkpoints").exists()
        result = None if signal else (observe(main, member.config) or [None])[-1]
        if _interrupted(result):
          print(f"sweep: stopped{f' by {signal}' if signal else ''} after {len(results)} of "
                f"{total} members; run the same command to resume")
          return None
        results[member.name] = (result, "resumed" if resumed else "alone")
  return results
