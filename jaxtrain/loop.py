"""``fit``: epochs of shuffled mini-batches, validation, curves and early stopping.

The loop is thin: each epoch is one or a few calls of a compiled program
(:mod:`jaxtrain.program`) and one host sync, after which the epoch's metrics are
logged and early stopping decides. A run is a pure function of its seed and
config: the shuffle key is folded with the epoch, the dropout key with the step.
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

from jaxtrain import data, parallel
from jaxtrain.feed import DeviceFeed, HostFeed, fits_on_device
from jaxtrain.program import ProgramSpec, means
from jaxtrain.checkpoint import state_arrays, with_arrays
from jaxtrain.conv import resolve_impl
from jaxtrain.state import TrainState
from jaxtrain.step import compute_gradients
from jaxtrain.stopping import Best, EarlyStopping

COLUMNS = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "train_loss_running", "learning_rate", "seconds")
EXECUTIONS = ("auto", "scan", "step")
CALL_SECONDS = 1.0  # the wall time one compiled call aims for
MAX_SPAN_STEPS = 4096  # steps one call may run (whole epochs, at least one)


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How to train; every field is part of the run's identity except ``progress``.

  Attributes:
    epochs: passes over the training set (>= 1).
    batch_size: global mini-batch size (1 ..= training-set size).
    seed: the run's seed: shuffling, dropout and augmentation keys derive from it.
    eval_batch_size: batch size of evaluations (0: max(batch_size, 1024)).
    eval_every_steps: also evaluate every N steps (0: only at epoch ends); the
      values land in the per-step history as ``train_accuracy`` etc.
    evaluate_train: evaluate the whole training set in eval mode each epoch.
    drop_remainder: drop the incomplete last batch instead of padding it.
    early_stopping: the rule, or ``None``.
    nonfinite: ``"stop"`` the run at the first non-finite loss or gradient, or
      ``"skip"`` such updates.
    execution: ``"scan"`` (K steps per compiled call), ``"step"`` (one step per
      call) or ``"auto"`` (chosen per model and backend).
    data: where the training data live: ``"device"`` (fast path), ``"host"``
      (streamed batch by batch, prefetched; for data that do not fit) or
      ``"auto"`` (the device when the arrays take under half its memory).
    steps_per_call: the most steps one compiled call runs (0: whole epochs,
      as many as take about a second, up to 4096 steps). Calls also end where
      the host must act: early stopping, histograms, checkpoints.
    devices: data-parallel devices (shard_map over the first N local devices).
    histogram_every: epochs between weight/gradient histograms (0: never).
    progress: progress bar (``None``: when on a terminal).
  """

  epochs: int
  batch_size: int
  seed: int = 0
  eval_batch_size: int = 0
  eval_every_steps: int = 0
  evaluate_train: bool = True
  drop_remainder: bool = False
  early_stopping: EarlyStopping | None = None
  nonfinite: str = "stop"
  execution: str = "auto"
  data: str = "auto"
  steps_per_call: int = 0
  devices: int = 1
  histogram_every: int = 5
  progress: bool | None = None


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns.

  Attributes:
    state: the final state (the best epoch's parameters when early stopping
      restored them).
    history: ``{"epoch": {column: [...]}, "step": {"step": [...], "loss": [...], ...}}``.
    best: the best epoch by the monitored metric.
    stop_reason: why the run ended early, or ``None``.
    test: test-set metrics when a test set was given.
  """

  state: TrainState
  history: dict[str, dict[str, list]]
  best: Best
  stop_reason: str | None = None
  test: dict[str, float] | None = None


def validate(config: FitConfig, n_train: int, *, has_val: bool) -> None:
  """Raises ValueError naming the first bad setting (before anything is written)."""
  def bad(name, value, why):
    raise ValueError(f"{name} {why}, got {value!r}")

  def integer(value):
    return isinstance(value, int) and not isinstance(value, bool)

  if not integer(config.epochs) or config.epochs < 1:
    bad("epochs", config.epochs, "must be an integer >= 1")
  if not integer(config.batch_size) or config.batch_size < 1:
    bad("batch_size", config.batch_size, "must be an integer >= 1")
  if config.batch_size > n_train:
    bad("batch_size", config.batch_size, f"must not exceed the {n_train} training examples")
  for name in ("eval_batch_size", "eval_every_steps", "steps_per_call", "histogram_every"):
    if getattr(config, name) < 0:
      bad(name, getattr(config, name), "must be >= 0")
  if config.nonfinite not in ("stop", "skip"):
    bad("nonfinite", config.nonfinite, "must be 'stop' or 'skip'")
  if config.data not in ("auto", "device", "host"):
    bad("data", config.data, "must be 'auto', 'device' or 'host'")
  if config.execution not in EXECUTIONS:
    bad("execution", config.execution, f"must be one of {EXECUTIONS}")
  if not 1 <= config.devices <= jax.local_device_count():
    bad("devices", config.devices, f"must be in 1..{jax.local_device_count()} (local devices)")
  if config.batch_size % config.devices:
    bad("batch_size", config.batch_size, f"must be divisible by the {config.devices} devices")
  if config.drop_remainder and n_train < config.batch_size:
    bad("batch_size", config.batch_size, "with drop_remainder leaves no batch")
  rule = config.early_stopping
  if rule is not None:
    logged = {"train_loss_running", "learning_rate"}
    if config.evaluate_train:
      logged |= {"train_loss", "train_accuracy"}
    if has_val:
      logged |= {"val_loss", "val_accuracy"}
    if rule.monitor not in logged:
      why = ("needs validation data" if rule.monitor in COLUMNS and rule.monitor.startswith("val_")
             else f"is not a metric this run logs ({', '.join(sorted(logged))})")
      raise ValueError(f"early stopping monitor {rule.monitor!r} {why}")


def choose_execution(state: TrainState, config: FitConfig) -> str:
  """``"scan"`` unless measurements say one straight-line step per call is faster.

  XLA:CPU runs ``lax.conv`` inside a loop several times slower than in a
  straight-line program (jax#12868; 1.03 s against 0.17 s a step in
  BENCHMARKS.md), so on CPU a model with 4-D kernels steps one call at a time,
  unless it is one of ours computing its convolutions as matmuls (the CPU
  default), which loops fast.
  """
  if config.execution != "auto":
    return config.execution
  if jax.default_backend() != "cpu":
    return "scan"
  if not any(np.ndim(p) == 4 for p in jax.tree.leaves(state.params)):
    return "scan"
  module = getattr(state.apply_fn, "__self__", None)
  impl = getattr(module, "conv_impl", None)
  return "scan" if impl is not None and resolve_impl(impl) == "matmul" else "step"


def program_spec(config: FitConfig, n_train: int, eval_sizes=()) -> ProgramSpec:
  """The compiled programs' static description for a run of ``config``."""
  spe = data.num_batches(n_train, config.batch_size, config.drop_remainder)
  return ProgramSpec(
      num_train=n_train, batch_size=config.batch_size,
      eval_batch_size=_eval_batch_size(config, [n_train, *eval_sizes]),
      drop_remainder=config.drop_remainder, nonfinite=config.nonfinite,
      eval_every=config.eval_every_steps,
      max_steps=config.steps_per_call or spe * max(1, MAX_SPAN_STEPS // spe))


def _as_arrays(split: Mapping[str, Any] | None, name: str):
  if split is None:
    return None
  data.check_arrays(split, 1)
  if not {"inputs", "targets"} <= set(split):
    raise ValueError(f"{name} data must hold 'inputs' and 'targets', got {sorted(split)}")
  return {k: np.asarray(v) for k, v in split.items()}


def _eval_batch_size(config: FitConfig, sizes) -> int:
  size = config.eval_batch_size or max(config.batch_size, 1024)
  size = min(size, max(sizes))  # never pad a small set to a huge batch
  return -(-size // config.devices) * config.devices


def _row(epoch, step, sums, step_metrics, seconds) -> dict[str, Any]:
  row = {"epoch": epoch, "step": step}
  for split in ("train", "val"):
    if split in sums:
      for name, value in means(sums[split]).items():
        row[f"{split}_{name}"] = float(value)
  row["train_loss_running"] = float(np.mean(step_metrics["loss"], dtype=np.float64))
  row["learning_rate"] = float(step_metrics["learning_rate"][-1])
  row["seconds"] = seconds
  return row


@dataclasses.dataclass
class Position:
  """Where a run stands; checkpointed with the state so a resume is exact.

  Attributes:
    epoch: epochs completed.
    batch: batches done in the current (incomplete) epoch.
    best: the early-stopping / best-epoch record.
    rows: the epoch rows written so far (metrics.csv).
    partial: the current epoch's per-step metrics so far.
    step_records: per-step records logged so far (steps.jsonl lines).
    stop_reason: why the run ended early, if it did.
  """

  epoch: int = 0
  batch: int = 0
  best: Best = dataclasses.field(default_factory=Best)
  rows: list = dataclasses.field(default_factory=list)
  partial: dict = dataclasses.field(default_factory=dict)
  step_records: int = 0
  stop_reason: str | None = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> Position:
    return cls(**{**record, "best": Best(**record["best"])})


def fit(state: TrainState, train: Mapping[str, Any], *, config: FitConfig,
        val: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
        augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        monitor=None, log: Callable[[str], None] | None = None, checkpointer=None,
        should_stop: Callable[[], str | None] | None = None) -> FitResult:
  """Trains ``state`` on ``train`` for ``config.epochs`` epochs.

  Args:
    state: from :func:`jaxtrain.create_train_state` (built once per run).
    train: ``{"inputs", "targets"}`` arrays, kept on the device.
    config: a :class:`FitConfig`.
    val: validation arrays, evaluated every epoch.
    test: test arrays, evaluated once at the end (only when given).
    augment: ``augment(key, one_example_inputs)``, applied to training inputs
      with a key per step and row.
    monitor: a :class:`jaxtrain.monitor.RunMonitor`, or a function
      ``(rows, step_records) -> RunMonitor`` called once the run's position is
      known (after a resume: the epoch rows and step records to keep).
    log: where one-line messages (early stop, non-finite loss) go (default: the
      monitor's ``write``, else ``print``).
    checkpointer: a :class:`jaxtrain.checkpoint.Checkpointer`; the run resumes
      from its latest good checkpoint and saves on its cadence and at the end.
    should_stop: polled at every call boundary; a returned reason (e.g. a
      signal's name) saves a checkpoint and ends the run cleanly.

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
  >>> result.history["epoch"]["val_accuracy"][-1] > 0.9
  True
  """
  train = _as_arrays(train, "train")
  val, test = _as_arrays(val, "val"), _as_arrays(test, "test")
  validate(config, len(train["targets"]), has_val=val is not None)
  rule = config.early_stopping
  n_train = len(train["targets"])
  mesh = parallel.local_mesh(jax.local_devices()[: config.devices]) if config.devices > 1 else None
  execution = choose_execution(state, config)
  spec = program_spec(config, n_train, [len(s["targets"]) for s in (val, test) if s])
  spe = spec.steps_per_epoch
  on_device = config.data == "device" or (
      config.data == "auto" and fits_on_device(train, val))
  epoch_evals = {"train": train} if config.evaluate_train else {}
  if val is not None:
    epoch_evals["val"] = val
  feed = (DeviceFeed if on_device else HostFeed)(
      spec, train, epoch_evals, augment=augment, mesh=mesh,
      step_evals=bool(config.eval_every_steps), straight=execution == "step")
  keep_best = rule is not None and rule.restore_best
  tree = {"state": state_arrays(state)}
  if keep_best:
    tree["best"] = {"params": state.params, "batch_stats": state.batch_stats}
  tree = feed.place(tree, copy=True)  # donated below; the caller's state survives
  position = Position()
  say = log or print
  if checkpointer is not None:
    restored = checkpointer.restore(tree)
    if restored is not None:
      step, tree, meta = restored
      position = Position.from_json(meta["position"])
      say(f"resuming from the checkpoint at step {step} (epoch {position.epoch + 1}, "
          f"batch {position.batch}) in {checkpointer.directory}")
  owns_monitor = monitor is not None and not hasattr(monitor, "log_steps")
  if owns_monitor:
    fresh = position.epoch == 0 and position.batch == 0
    monitor = monitor(position.rows, None if fresh else position.step_records)
  if log is None:
    log = monitor.write if monitor is not None else print
  state = with_arrays(state, tree["state"])
  best_variables = tree.get("best")
  halted = feed.place(jnp.zeros((), bool))
  run_key = jax.random.key(config.seed)
  window = parallel.InFlight(parallel.default_max_in_flight(
      jax.local_devices()[: config.devices]))

  def save(position: Position, *, metric=None):
    if checkpointer is None:
      return
    if monitor is not None:
      monitor.flush()  # the checkpoint counts these lines as written
    saved = {"state": state_arrays(state)}
    if keep_best:
      saved["best"] = best_variables
    meta = {"position": position.to_json(), "seed": config.seed,
            "run_key": np.asarray(jax.random.key_data(run_key)).tolist()}
    checkpointer.save(position.epoch * spe + position.batch, saved, meta, metric)

  history = {"epoch": {c: [] for c in COLUMNS}, "step": {}}
  for row in position.rows:
    _extend(history["epoch"], row)
  stop_reason, interrupted = position.stop_reason, None
  total = config.epochs * spe
  max_steps = feed.max_steps
  compiled = False
  epoch_seconds = 0.0  # wall time spent so far on the current epoch
  # Calls grow to about CALL_SECONDS of work once a call has been timed, so
  # signals and time-based saves are seen about that often (the numbers do not
  # depend on where calls end).
  call_epochs, timed = 1, 0

  def host_needs_epoch(epoch: int) -> bool:
    """Whether the host must act right after epoch ``epoch`` (1-based) ends,
    with that epoch's state: early stopping, histograms, an epoch-cadence save."""
    return (rule is not None
            or (monitor is not None and monitor.histograms_due(epoch))
            or (checkpointer is not None and checkpointer.due_at_epoch(epoch)))

  def plan(first: int) -> int:
    """Where the call starting at global step ``first`` ends."""
    # max_steps is steps_per_call when that is set (see program_spec).
    end = min(total, first + max_steps, first + call_epochs * spe)
    if checkpointer is not None:
      end = min(end, first + (checkpointer.steps_to_boundary(first) or total))
    boundary = (first // spe + 1) * spe
    while boundary < end and not host_needs_epoch(boundary // spe):
      boundary += spe
    return min(end, boundary)

  def absorb(call) -> str | None:
    """Fetches a call's results (one host sync) and logs them: per-step records,
    then a row for every epoch that ended in it. Returns a stop reason."""
    nonlocal position, best_variables, epoch_seconds, call_epochs, timed
    first, end, chunks, started = call
    fetched = jax.device_get([(c.steps, c.epochs) for c in chunks])
    per_step = (time.perf_counter() - started) / (end - first)
    timed += 1
    if timed > 1:  # the first call's time is mostly compiling
      # At most an eighth of the run per call, so the host logs one call while
      # the device runs the next rather than all epochs after the last.
      call_epochs = max(1, min(int(CALL_SECONDS / (per_step * spe)),
                               -(-config.epochs // 8)))
    steps = {k: np.concatenate([f[0][k][: c.num] for f, c in zip(fetched, chunks)])
             for k in fetched[0][0]}
    epoch_sums = {}
    for (_, sums), chunk in zip(fetched, chunks):
      for epoch in range(chunk.first // spe, (chunk.first + chunk.num) // spe):
        if sums is not None:
          epoch_sums[epoch] = jax.tree.map(lambda v: v[epoch - chunk.first // spe], sums)  # noqa: B023
    position, steps, reason = _log_steps(position, steps, first, spe, config, monitor,
                                         history, log)
    stop = first + len(steps["loss"])
    while position.epoch * spe + position.batch < stop:
      at = position.epoch * spe + position.batch
      epoch = position.epoch
      upto = min(stop, (epoch + 1) * spe)
      epoch_seconds += per_step * (upto - at)
      def so_far(key):  # this epoch's values of a per-step metric, in order
        return np.concatenate([np.asarray(position.partial.get(key, []), np.float64),  # noqa: B023
                               np.asarray(steps[key][at - first: upto - first], np.float64)])  # noqa: B023

      if upto < (epoch + 1) * spe or (reason and upto == stop):
        # The epoch goes on in the next call (or the run stopped inside it).
        position = dataclasses.replace(position, batch=upto - epoch * spe,
                                       partial={k: so_far(k).tolist() for k in steps})
        break
      row = _row(epoch + 1, upto, epoch_sums.get(epoch, {}),
                 {k: so_far(k) for k in ("loss", "learning_rate")}, epoch_seconds)
      epoch_seconds = 0.0
      _extend(history["epoch"], row)
      if monitor is not None:
        monitor.log_epoch(row)
        if monitor.histograms_due(epoch + 1):  # planned as a call end: state is current
          monitor.log_histograms(row["step"], state.params,
                                 _gradients(state, train, config, run_key))
      best = position.best.update(row.get(rule.monitor if rule else "val_loss", math.nan),
                                  epoch + 1, rule)
      if keep_best and best.epoch == epoch + 1:
        best_variables = jax.tree.map(jnp.copy, {"params": state.params,
                                                 "batch_stats": state.batch_stats})
      if best.should_stop(rule):
        reason = (f"early stopping after epoch {epoch + 1}: {rule.monitor} has not improved "
                  f"for {rule.patience} epochs; best epoch {best.epoch} "
                  f"({rule.monitor} {best.value:.6g})")
        log(reason)
      position = dataclasses.replace(position, epoch=epoch + 1, batch=0, best=best,
                                     rows=position.rows + [row], partial={},
                                     stop_reason=reason)
      if reason:
        break
    return reason

  first = position.epoch * spe + position.batch
  lagged = None  # a call dispatched but not yet fetched (nothing needed its results)
  while stop_reason is None and interrupted is None and first < total:
    end = plan(first)
    call_started = time.perf_counter()
    state, halted, chunks = feed.train(state, halted, run_key, first, end - first)
    for chunk in chunks:
      window(chunk.steps)
    if not compiled:
      jax.block_until_ready(chunks[-1].steps)
      compiled = True
      if monitor is not None:
        monitor.mark_compiled()
    call = (first, end, chunks, call_started)
    if lagged is not None:
      # The previous call's results are fetched only now, after this call is
      # queued, so the device never waits for the host between calls.
      stop_reason, lagged = absorb(lagged), None
      if stop_reason:
        break
    first = end
    interrupted = should_stop() if should_stop else None
    epoch_end = end % spe == 0
    saving = checkpointer is not None and (
        interrupted or end == total
        or checkpointer.due(step=end, epoch_end=epoch_end, epoch=end // spe))
    if not (saving or interrupted or end == total
            or (epoch_end and host_needs_epoch(end // spe))):
      lagged = call
      continue
    stop_reason = absorb(call)
    if checkpointer is not None and (saving or stop_reason) and (
        not stop_reason or position.stop_reason):
      row = position.rows[-1] if epoch_end and position.rows else {}
      save(position, metric=row.get(checkpointer.config.monitor,
                                    row.get("train_loss", math.nan)) if row else None)
  if lagged is not None and stop_reason is None:
    stop_reason = absorb(lagged)
  lagged = None

  window.drain()
  if stop_reason and not position.stop_reason and checkpointer is not None:
    # A non-finite stop inside an epoch: record it so a rerun does not retrain.
    save(dataclasses.replace(position, stop_reason=stop_reason))
  if interrupted:
    where = (f"step {position.epoch * spe + position.batch} (epoch {position.epoch + 1}, "
             f"batch {position.batch})")
    if checkpointer is not None:
      log(f"{interrupted}: saved a checkpoint at {where} in {checkpointer.directory}; "
          "run the same command to resume")
    else:
      log(f"{interrupted}: stopped at {where}; checkpointing is off, nothing was saved")
    stop_reason = f"interrupted by {interrupted}"
  if checkpointer is not None:
    checkpointer.wait()
  if keep_best and best_variables is not None and position.best.epoch:
    state = state.replace(**best_variables)
    log(f"restored the parameters of epoch {position.best.epoch} "
        f"({rule.monitor} {position.best.value:.6g})")
  test_metrics = None
  if test is not None and not interrupted:
    test_sums = jax.device_get(feed.evaluate(state, {"test": test}))
    test_metrics = {k: float(v) for k, v in means(test_sums["test"]).items()}
  if owns_monitor:
    monitor.close()
  return FitResult(state=state, history=history, best=position.best,
                   stop_reason=stop_reason, test=test_metrics)


def _log_steps(position: Position, metrics: Mapping[str, np.ndarray], first: int, spe: int,
               config: FitConfig, monitor, history, log):
  """Logs the fetched per-step metrics of global steps ``first ..``. With
  ``nonfinite="stop"`` they end at the first non-finite loss or gradient, and a
  stop reason says so. Returns ``(position, metrics, stop_reason)``."""
  steps = np.arange(first + 1, first + 1 + len(metrics["loss"]))
  stop_reason = None
  bad = np.flatnonzero(~metrics["finite"])
  if bad.size and config.nonfinite == "stop":
    index = int(bad[0])
    epoch, batch = divmod(int(steps[index]) - 1, spe)
    stop_reason = (
        f"non-finite loss or gradient at step {steps[index]} (epoch {epoch + 1}, batch "
        f"{batch + 1}): stopped; the state is the one before that step")
    steps, metrics = steps[: index + 1], {k: v[: index + 1] for k, v in metrics.items()}
  _extend(history["step"], {"step": steps, **metrics})
  if monitor is not None:
    monitor.log_steps(steps, metrics)
  if stop_reason:
    log(stop_reason)
  position = dataclasses.replace(position, step_records=position.step_records + len(steps))
  return position, metrics, stop_reason


def _extend(table: dict[str, list], values: Mapping[str, Any]) -> None:
  for key, value in values.items():
    column = table.setdefault(key, [])
    if isinstance(value, np.ndarray):
      column.extend(value.tolist())
    else:
      column.append(value)


def _gradients(state: TrainState, train, config: FitConfig, run_key):
  """The gradient on the first training batch, for histograms."""
  batch = {k: v[: config.batch_size] for k, v in train.items()}
  grads, _, _ = _jit_gradients(jax.device_get(state), batch, run_key)
  return grads


_jit_gradients = jax.jit(compute_gradients)
