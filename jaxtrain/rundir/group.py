"""Runs that differ only in injected hyper-parameters and seeds, trained in one
vmapped program, each into its own run directory.

A sweep over learning rates (or weight decays, or seeds) of one model trains
its members as one :func:`jaxtrain.many.fit_many` program: on a small model the
members cost about as much as one. Each member's directory is what
:func:`jaxtrain.run.run` leaves for that member alone (``config.json``,
``metrics.csv``, ``steps.jsonl``, TensorBoard scalars, ``curves.png`` and a
checkpoint at its last step that holds its best epoch's parameters), with the
numbers of a separate run up to float rounding of batched matmuls: so
``checkpoint.load(member_dir, "best")`` works, and ``run`` on that directory
(the member's own command, e.g. with more epochs) continues it.

Not kept per member: weight, gradient and activation histograms, and
checkpoints during training (a group interrupted is trained again).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.state import TrainState, state_arrays
from jaxtrain.data.batching import num_batches
from jaxtrain.data.indexed import length
from jaxtrain.data.sources import Source
from jaxtrain.rundir import trackers
from jaxtrain.rundir.checkpoint import Checkpointer
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.rundir.plots import plot_curves, read_history
from jaxtrain.rundir.record import check_record, write_config
from jaxtrain.train import many
from jaxtrain.train.config import FitConfig, as_arrays, columns, plan_epochs
from jaxtrain.train.fit import FitResult
from jaxtrain.train.ledger import Position, advance
from jaxtrain.train.logstore import FOLDER, RowLog


@dataclasses.dataclass(frozen=True)
class RunCall:
  """The arguments of one :func:`jaxtrain.run.run` call (see there)."""

  state: TrainState
  train: Mapping[str, Any]
  config: FitConfig
  workdir: pathlib.Path
  record: Mapping[str, Any]
  val: Mapping[str, Any] | None = None
  test: Mapping[str, Any] | None = None
  augment: Callable | None = None
  overwrite: bool = False
  checkpoint: Any = None
  extra_curves: Mapping[str, Any] | None = None
  build: str | None = None
  callbacks: Any = None  # as for fit: a member with callbacks trains alone
  track: Any = None  # trackers (names); each member logs to its own tracked runs
  writers: Any = ()  # your own writers: a member with writers trains alone

  def full_record(self) -> dict[str, Any]:
    """config.json as ``run`` writes it."""
    return {**self.record, "checkpoint": self.checkpoint,
            **({"build": self.build} if self.build else {})}


def _sets(call: RunCall):
  return {"train": call.train, "val": call.val, "test": call.test}


def _shapes(tree) -> list:
  return [(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
          for x in jax.tree.leaves(tree)]


def vmap_problem(calls: Sequence[RunCall]) -> str | None:
  """Why these runs cannot train in one vmapped program, or None.

  They can when their fit configs agree but for the seed, their states differ
  only in array values (an injected learning rate or weight decay, the
  initialisation) with the same model and losses, and their data has the same
  shapes; early stopping, plateau schedules, several devices, streamed data
  and profiles are for separate runs.
  """
  first = calls[0]
  base = dataclasses.replace(first.config, seed=0)
  if (base.early_stopping is not None or base.reduce_lr_on_plateau is not None
      or base.devices != 1 or base.profile_steps is not None or base.data == "stream"):
    return ("early stopping, plateau schedules, --devices, --profile-steps and streamed data "
            "train members one by one")
  if any(call.callbacks for call in calls):
    return "members with callbacks train one by one"
  if any(call.writers for call in calls):
    return "members with writers train one by one"
  structure = jax.tree.structure(first.state)
  for call in calls[1:]:
    if dataclasses.replace(call.config, seed=0) != base:
      return "the members' fit configs differ"
    if (not _same_function(call.state.apply_fn, first.state.apply_fn) or jax.tree.structure(
        call.state.replace(tx=first.state.tx, apply_fn=first.state.apply_fn)) != structure):
      return "the members' models, losses or metrics differ"
    if _shapes(call.state) != _shapes(first.state):
      return "the members' parameters differ in shape"
    if ((call.augment is None) != (first.augment is None) or call.checkpoint != first.checkpoint
        or (call.augment is not None and not _same_function(call.augment, first.augment))):
      return "the members' augmentation or checkpoint settings differ"
    for name, split in _sets(call).items():
      other = _sets(first)[name]
      if isinstance(split, Source) or isinstance(other, Source):
        return "streamed data trains members one by one"
      if (split is None) != (other is None) or (
          split is not None and _shapes(dict(split)) != _shapes(dict(other))):
        return f"the members' {name} sets differ in shape"
  return None


def _same_function(a, b) -> bool:
  """Whether ``a`` and ``b`` compute the same: equal, one method of equal
  objects (two equal Flax modules' ``apply``: bound methods compare their
  objects by identity), or one function closed over equal values (an
  augmentation made per run by the same factory)."""
  if a is b or a == b:
    return True
  if hasattr(a, "__self__") and hasattr(b, "__self__"):
    return getattr(a, "__func__", a) is getattr(b, "__func__", b) and a.__self__ == b.__self__
  code = getattr(a, "__code__", None)
  if code is None or code is not getattr(b, "__code__", None):
    return False
  cells = [(x.cell_contents, y.cell_contents)
           for x, y in zip(a.__closure__ or (), b.__closure__ or ())]
  return (a.__defaults__ == b.__defaults__ and a.__globals__ is b.__globals__
          and all(type(x) is type(y) and (x is y or _equal(x, y)) for x, y in cells))


def _equal(x, y) -> bool:
  try:
    return bool(x == y)
  except Exception:  # noqa: BLE001 - arrays, or objects without a plain ==
    return False


def _same(splits) -> bool:
  first = splits[0]
  return all(s is first or (s.keys() == first.keys() and all(
      np.array_equal(s[k], first[k]) for k in s)) for s in splits[1:])


def run_group(calls: Sequence[RunCall], *, should_stop: Callable[[], str | None] | None = None,
              say: Callable[[str], None] = print) -> list[FitResult] | None:
  """Trains ``calls`` (``vmap_problem(calls)`` is None) in one program, each
  member into its own run directory (a directory there is replaced).

  Returns:
    Each member's :class:`~jaxtrain.FitResult` (its history read back from
    ``metrics.csv``), or None when ``should_stop`` stopped the group.
  """
  problem = vmap_problem(calls)
  if problem:
    raise ValueError(problem)
  first = calls[0]
  like = jax.tree.structure(first.state)
  states = many.stack([jax.tree.unflatten(like, jax.tree.leaves(c.state)) for c in calls])
  sets = {}
  member_data = not all(_same([as_arrays(_sets(c)[n], n) for c in calls])
                        for n in ("train", "val", "test") if _sets(first)[n] is not None)
  for name, split in _sets(first).items():
    if split is not None:
      arrays = [as_arrays(_sets(c)[name], name) for c in calls]
      sets[name] = many.stack(arrays) if member_data else arrays[0]
  config = first.config
  has_val = first.val is not None
  logged = columns(first.state, config, first.train, has_val=has_val)
  plan = plan_epochs(config, first.checkpoint, logged, has_val=has_val)
  members = []
  try:
    for c in calls:
      members.append(_Member(c, logged, plan, config.epochs))
    best = {"params": jax.tree.map(jnp.copy, states.params),
            "batch_stats": jax.tree.map(jnp.copy, states.batch_stats)}

    def on_epoch(epoch, stacked, fetched):
      improved = np.asarray([member.absorb(fetched[m]) for m, member in enumerate(members)])
      if plan.keep and improved.any():  # each member's best epoch's variables, on the device
        best.update(_keep(best, {"params": stacked.params, "batch_stats": stacked.batch_stats},
                          jnp.asarray(improved)))
      if config.progress is not False:
        say(_line(epoch, config.epochs, members, plan.ranking.monitor))

    result = many.fit_many(states, sets["train"], val=sets.get("val"), test=sets.get("test"),
                           seeds=[c.config.seed for c in calls], member_data=member_data,
                           config=config, augment=first.augment, on_epoch=on_epoch,
                           should_stop=should_stop)
    if result is None:
      return None
    return [member.finish(many.unstack(result.state, m), many.unstack(best, m),
                          result.test and result.test[m]) for m, member in enumerate(members)]
  finally:
    for member in members:
      member.close()


@functools.partial(jax.jit, donate_argnums=0)
def _keep(best, current, improved):
  """``current``'s members where ``improved``, else ``best``'s."""
  def pick(b, c):
    return jnp.where(improved.reshape((-1,) + (1,) * (c.ndim - 1)), c, b)

  return jax.tree.map(pick, best, current)


def _line(epoch: int, epochs: int, members, monitor: str) -> str:
  values = [m.position.rows[-1].get(monitor) if m.position.rows else None for m in members]
  shown = "  ".join(f"{v:.4g}" if v is not None else "-" for v in values)
  return f"epoch {epoch}/{epochs}  {monitor} of {len(members)} members  {shown}"


class _Member:
  """One member's run directory, written as ``fit`` would write it."""

  def __init__(self, call: RunCall, logged, plan, epochs: int):
    from jaxtrain.rundir.run import RUN_FILES, clear_run, lock_run_dir

    self.call, self.plan = call, plan
    record = call.full_record()
    check_record(record)
    trackers.check(call.track)  # before anything is written
    workdir = pathlib.Path(call.workdir)
    self.lock = lock_run_dir(workdir)
    if any((workdir / name).exists() for name in RUN_FILES):
      clear_run(workdir)
    write_config(workdir, record)
    self.spe = num_batches(length(call.train), call.config.update_batch_size,
                           call.config.drop_remainder)
    self.trackers = trackers.open_trackers(
        call.track, workdir, experiment=str(record.get("experiment") or workdir.name),
        config=record)
    self.monitor = RunMonitor(workdir, columns=logged, total_steps=epochs * self.spe,
                              steps_per_epoch=self.spe, progress=False, quiet=True,
                              writers=self.trackers)
    self.position, self.stopped = Position(), None

  def absorb(self, fetched) -> bool:
    """Logs an epoch; whether it is the member's best so far."""
    if self.stopped:
      return False
    done = advance(self.position, fetched, steps_per_epoch=self.spe,
                   nonfinite=self.call.config.nonfinite, ranking=self.plan.ranking)
    self.monitor.log_steps(done.steps, done.metrics)
    for row in done.rows:
      self.monitor.log_epoch(row)
    self.position = done.position
    if done.nonfinite:
      self.stopped = done.nonfinite
      self.position = dataclasses.replace(self.position, stop_reason=done.nonfinite)
    return bool(done.rows) and done.position.best.epoch == done.rows[-1]["epoch"]

  def close(self) -> None:
    if getattr(self, "monitor", None) is not None:
      self.monitor.close()
    for tracker in getattr(self, "trackers", ()):
      tracker.close()
    self.lock.release()

  def finish(self, state: TrainState, best, test: dict | None) -> FitResult:
    """Saves the last state (unless it diverged) and plots the curves."""
    call, workdir = self.call, pathlib.Path(self.call.workdir)
    if call.checkpoint is not None and not self.stopped:
      saved = {"state": state_arrays(state)}
      if self.plan.keep:
        saved["best"] = best
      row = self.position.rows[-1] if self.position.rows else {}
      metric = row.get(self.plan.checkpoint_monitor, math.nan) if row else None
      checkpointer = Checkpointer(workdir, call.checkpoint)
      try:
        folder = checkpointer.directory / FOLDER  # the logs' lines go there, counted here
        rows = RowLog(folder=folder)
        rows.add_rows(self.position.rows)
        meta = {"position": rows.position(self.position, self.position.best.step(self.spe)),
                "seed": call.config.seed, "num_train": length(call.train),
                "run_key": np.asarray(jax.random.key_data(
                    jax.random.key(call.config.seed))).tolist(),
                "step_log": self.monitor.step_log(folder)}
        self.monitor.close()
        checkpointer.save(self.position.step(self.spe), saved, meta, metric)
      finally:
        checkpointer.close()
    self.monitor.close()
    history = read_history(workdir)
    plot_curves(history, workdir / "curves.png", extra=call.extra_curves)
    best = self.position.best
    return FitResult(state=state, history=history, best=best, stop_reason=self.stopped,
                     test=None if self.stopped else test, best_step=best.step(self.spe))
