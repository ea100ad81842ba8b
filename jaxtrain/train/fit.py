"""``fit``: epochs of shuffled mini-batches, validation, curves and early stopping.

``fit`` is a short driver. It dispatches compiled calls through a feed
(:mod:`jaxtrain.engine.feeds`), asks the run's :class:`~jaxtrain.train.cadence.Cadence`
where the next call must end, fetches each call's metrics one call late (so the
device never waits for the host), and hands them to the pure ledger
(:func:`jaxtrain.train.ledger.advance`), whose verdict it carries out: log the
records and rows, keep the best epoch's parameters, checkpoint, stop. A run is a
pure function of its seed and config: the shuffle key is folded with the epoch,
the dropout key with the step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core import plateau as plateau_lib
from jaxtrain.core.metrics import means
from jaxtrain.core.state import TrainState, state_arrays, with_arrays
from jaxtrain.data.indexed import length
from jaxtrain.engine import best as best_lib
from jaxtrain.engine import distributed, parallel
from jaxtrain.engine.calls import Carry
from jaxtrain.train import callbacks as callbacks_lib
from jaxtrain.train.cadence import Pace, agreed_boundary, agreed_start
from jaxtrain.train.config import (
  FitConfig,
  as_arrays,
  columns,
  plan_cadence,
  plan_epochs,
  validate,
)
from jaxtrain.train.driver import (
  Call,
  RunContext,
  absorb,
  call_back,
  save_checkpoint,
  say_interrupted,
)
from jaxtrain.train.history import StepHistory
from jaxtrain.train.ledger import Position, extend_rows
from jaxtrain.train.planning import plan_feed
from jaxtrain.train.progress import Progress
from jaxtrain.train.resume import open_monitor, resume
from jaxtrain.train.stopping import Best
from jaxtrain.train.throughput import Profile, measure_run


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns.

  Attributes:
    state: the final state (the best epoch's parameters when early stopping
      restored them).
    history: ``{"epoch": {column: [...]}, "step": {"step": [...], "loss": [...], ...}}``:
      every epoch; every step up to 100,000 steps, and past that every
      ``k``-th step (``k`` = 2, 4, 8, ...: between 50,000 and 100,000 rows)
      and the last (:mod:`jaxtrain.train.history`): its memory does not grow
      with the run. A run directory's ``steps.jsonl`` keeps every step.
    best: the best epoch by the monitored metric.
    stop_reason: why the run ended early, or ``None``.
    test: test-set metrics when a test set was given.
    best_step: the global step at the end of the best epoch (None before any).
    restored_best: whether ``state`` holds the best epoch's parameters (early
      stopping restored them: then ``state.step`` and ``opt_state`` remain
      those of the last step trained, ``best_step`` says where the parameters
      come from).
  """

  state: TrainState
  history: dict[str, dict[str, list]]
  best: Best
  stop_reason: str | None = None
  test: dict[str, float] | None = None
  best_step: int | None = None
  restored_best: bool = False


def fit(state: TrainState, train: Mapping[str, Any], *, config: FitConfig,
        val: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
        augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        monitor=None, log: Callable[[str], None] | None = None, checkpointer=None,
        should_stop: Callable[[], str | None] | None = None,
        callbacks: list | None = None) -> FitResult:
  """Trains ``state`` on ``train`` until ``config.epochs`` epochs are done.

  A state that has trained already (``state.step > 0``, e.g. the state of an
  earlier ``fit``) continues the same run from its step: the epoch, the batch
  inside it and the shuffle order follow from ``state.step``, so ``fit`` to
  epoch 1 and then ``fit`` of its state to epoch 2 equals ``fit`` to epoch 2,
  bit for bit. The history then holds the epochs trained by this call (its
  steps: a bounded, evenly thinned sample once there are more than 100,000;
  see :class:`FitResult`).

  Args:
    state: from :func:`jaxtrain.create_train_state` (built once per run), or a
      trained state to continue.
    train: ``{"inputs", "targets"}`` arrays, kept on the device.
    config: a :class:`FitConfig`.
    val: validation arrays, evaluated every epoch.
    test: test arrays, evaluated once at the end (only when given).
    augment: ``augment(key, one_example_inputs)``, applied to training inputs
      with a key per step and row.
    monitor: a :class:`jaxtrain.monitor.RunMonitor`, or a function
      ``(rows, step_records) -> RunMonitor`` called once the run's position is
      known (after a resume: the epoch rows and step records to keep). Without
      one, process 0 shows ``config.progress`` (a
      :class:`~jaxtrain.train.progress.Progress`: the bar on a terminal, a
      line per epoch) and writes no file.
    log: where one-line messages (early stop, non-finite loss) and, without a
      monitor, the epoch lines go (default: the monitor's ``write``, else
      stdout).
    checkpointer: a :class:`jaxtrain.checkpoint.Checkpointer`, or a function
      returning one (or None), called once every argument is checked; the run
      resumes from its latest good checkpoint and saves on its cadence and at
      the end.
    should_stop: polled at every call boundary; a returned reason (e.g. a
      signal's name) saves a checkpoint and ends the run cleanly.
    callbacks: :class:`~jaxtrain.train.callbacks.Callback` objects (or
      functions of an :class:`~jaxtrain.train.callbacks.Event`, called every
      epoch), called at their due points; they may log scalars and stop the
      run. One that raises ends the run, after a checkpoint, with a
      :class:`~jaxtrain.train.callbacks.CallbackError`.

  Returns:
    A :class:`FitResult`.

  >>> import jax, jax.numpy as jnp, numpy as np, jaxtrain
  >>> x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
  >>> arrays = {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.5), jax.random.key(0), x[:1],
  ...     loss_fn=jaxtrain.losses.cross_entropy)
  >>> result = fit(state, arrays, val=arrays, config=FitConfig(epochs=20, batch_size=16))
  epoch 1/20  train_loss ...
  >>> result.history["epoch"]["val_accuracy"][-1] > 0.9
  True
  """
  train, val, test = (as_arrays(s, n) for s, n in ((train, "train"), (val, "val"),
                                                  (test, "test")))
  validate(config, length(train))
  callbacks = callbacks_lib.as_callbacks(callbacks)
  if config.reduce_lr_on_plateau is not None and state.plateau is None:
    state = state.replace(plateau=plateau_lib.init(config.reduce_lr_on_plateau))
  logged = columns(state, config, train, has_val=val is not None)
  plan = plan_epochs(config, getattr(checkpointer, "config", None), logged,
                     has_val=val is not None)
  feed = plan_feed(state, train, config, val=val, test=test, augment=augment, epochs=plan)
  profile = Profile.plan(config, config.epochs * feed.spec.steps_per_epoch, monitor)
  if callable(checkpointer):  # a factory: everything is checked, the run may write now
    checked = hasattr(checkpointer, "config")
    checkpointer = checkpointer()
    if checkpointer is not None and not checked:  # a factory that names no config
      plan = plan_epochs(config, checkpointer.config, logged, has_val=val is not None)
      if plan.device_rule(feed.evals) != feed.spec.best:
        feed = plan_feed(state, train, config, val=val, test=test, augment=augment,
                         epochs=plan)
  if checkpointer is None:
    plan = dataclasses.replace(plan, checkpoint_monitor=None)
  spe = feed.spec.steps_per_epoch
  total = config.epochs * spe
  rule = config.early_stopping
  tree = feed.place({"state": state_arrays(state)}, copy=True)  # donated below
  if plan.keep:
    # Copies: placing one array twice may give one buffer, donated twice.
    tree["best"] = jax.tree.map(jnp.copy, {k: tree["state"][k]
                                           for k in ("params", "batch_stats")})
  position, tree, step_log, rows_log = resume(checkpointer, tree, log or print, Position.at(
      int(np.asarray(state.step)), spe), feed.spec.num_train, config.epochs, config.seed)
  monitor, owns_monitor = open_monitor(monitor, position, step_log, rows_log)
  if monitor is None and config.progress is not False and distributed.is_primary():
    # No run directory: the progress alone (its bar and lines), as a monitor's.
    monitor, owns_monitor = Progress(logged, total_steps=total, steps_per_epoch=spe,
                                     bar=config.progress, start=position.step(spe),
                                     say=log), True
  try:
    cadence = plan_cadence(config, spe, checkpointer, monitor, every_epoch=plan.keep
                           and feed.spec.best is None, callbacks=callbacks_lib.concern(
                               callbacks) if callbacks else None)
    run = RunContext(config, feed, cadence, jax.random.key(config.seed), train, checkpointer,
                     monitor, log or (monitor.write if monitor is not None else print), plan,
                     rows_log=rows_log, callbacks=callbacks)
    best = tree.get("best")
    carry = Carry(with_arrays(state, tree["state"]), feed.place(jnp.zeros((), bool)))
    if feed.spec.best is not None:
      # The programs keep the best epoch's variables in the carry.
      carry = carry._replace(best={**best, "value": feed.place(
          jnp.asarray(position.best.value, jnp.float32))})
      best = None
    window = parallel.InFlight(parallel.default_max_in_flight(
        jax.local_devices()[: config.devices]))
    history = {"epoch": {}, "step": StepHistory()}
    for row in position.rows:
      extend_rows(history["epoch"], row)
    pace, lagged, reason = Pace(), None, position.stop_reason
    first = position.step(spe)
    # One agreement per call boundary (cadence.py), this one before the first
    # call: a signal during start-up (nothing new to save), the first call's end.
    boundary = agreed_start(run.cadence, first, should_stop if first < total else None,
                            pace=pace, max_steps=feed.max_steps)
    interrupted = boundary.signal
    started_at = first
    compiled = False
    while reason is None and interrupted is None and first < total:
      end = boundary.next_end  # agreed: every process calls the same programs
      started = time.perf_counter()
      profile.before(first, monitor)
      carry, chunks = feed.train(carry, run.run_key, first, end - first)
      profile.after(end, chunks[-1].steps, run.log)
      call = Call(first, end, chunks, started)
      for chunk in chunks:
        window(chunk.steps)
      if not compiled:
        if monitor is not None:  # on the host, while the device runs the call
          run = dataclasses.replace(run, throughput=measure_run(
              carry.state, train, config, feed.spec, parallel.run_devices(config.devices)))
        jax.block_until_ready(chunks[-1].steps)
        compiled = True
        if monitor is not None:
          monitor.mark_compiled()
      if lagged is not None:
        # The previous call's results are fetched only now, after this call is
        # queued, so the device never waits for the host between calls.
        done, pace, best = absorb(run, lagged, position, pace, carry.state, best, history)
        position, reason, lagged = done.position, done.reason, None
        if reason:
          break
      first = end
      boundary = agreed_boundary(run.cadence, end, checkpointer, should_stop, pace=pace,
                                 max_steps=feed.max_steps)
      interrupted = boundary.signal
      if not boundary.fetch_now:
        lagged = call
        continue
      done, pace, best = absorb(run, call, position, pace, carry.state, best, history)
      position, reason = done.position, done.reason
      failure = None
      if "callbacks" in boundary.due and position.step(spe) == end:
        position, reason, failure = call_back(run, done, end, carry.state)
      if checkpointer is not None and (failure or boundary.saves(
          reason=reason, recorded=position.stop_reason is not None)):
        row = position.rows[-1] if end % spe == 0 and position.rows else {}
        metric = row.get(plan.checkpoint_monitor, math.nan)
        save_checkpoint(run, position, carry, best, metric=metric if row else None)
      if failure:  # saved: now end the run with it
        if checkpointer is not None:
          checkpointer.wait()
        raise failure
    if lagged is not None and reason is None:
      done, pace, best = absorb(run, lagged, position, pace, carry.state, best, history)
      position, reason = done.position, done.reason
    window.drain()
    if reason and not position.stop_reason and checkpointer is not None:
      # A non-finite stop inside an epoch: record it so a rerun does not retrain.
      save_checkpoint(run, dataclasses.replace(position, stop_reason=reason), carry, best)
    if interrupted and (reason or position.step(spe) >= total):
      interrupted = None  # the run ended at that very boundary: nothing to resume
    if interrupted:
      reason = say_interrupted(run, interrupted, position, spe,
                               trained=position.step(spe) > started_at)
    if checkpointer is not None:
      checkpointer.wait()
    state = carry.state
    best_step = position.best.step(spe)
    restored = bool(rule is not None and rule.restore_best and best_step)
    if restored:
      state = state.replace(**(best if best is not None else best_lib.variables(carry.best)))
      run.log(f"restored the parameters of epoch {position.best.epoch} (step {best_step}, "
              f"{rule.monitor} {position.best.value:.6g})")
    test_metrics = None
    if test is not None and not interrupted:
      test_sums = jax.device_get(feed.evaluate(state, {"test": test}))
      test_metrics = {k: float(v) for k, v in means(test_sums["test"]).items()}
      test_metrics.update({f"ema_{k}": float(v)
                           for k, v in means(test_sums.get("test_ema", {})).items()})
    return FitResult(state=state, history={**history, "step": history["step"].table()},
                     best=position.best, stop_reason=reason, test=test_metrics,
                     best_step=best_step, restored_best=restored)
  finally:
    profile.stop()
    if owns_monitor:
      monitor.close()
