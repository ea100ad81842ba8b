"""How to train: :class:`FitConfig`, its checks, and what it implies for a run's
epochs (:class:`EpochPlan`), logged columns and the cadence of the host's work.
What it compiles and how data reach it is :mod:`jaxtrain.train.planning`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxtrain.core.plateau import ReduceLROnPlateau
from jaxtrain.data.batching import check_arrays, num_batches
from jaxtrain.data.indexed import Source, head
from jaxtrain.nn import conv
from jaxtrain.train.cadence import At, Cadence, Every
from jaxtrain.train.stopping import EarlyStopping, Ranking
from jaxtrain.train.throughput import profile_range

COLUMNS = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "train_loss_running", "learning_rate", "seconds")
EXECUTIONS = ("auto", "scan", "step")
DATA = ("auto", "device", "stream", "host")  # "host": the earlier name of "stream"
MAX_SPAN_STEPS = 4096  # steps one call may run (whole epochs, at least one)
MAX_STEPS = 2**31 - 1  # the step counter is int32: a run's steps must fit in it


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
      call) or ``"auto"``: scan, unless the model runs ``lax.conv`` on CPU; then
      both are measured on a batch and step is taken only if it is 1.2x faster,
      the pick kept for the next run beside the compilation cache
      (:mod:`jaxtrain.train.execution`).
    data: where the training data live: ``"device"`` (fast path: resident, a
      source read whole), ``"stream"`` (read from the host step by step, each
      process its devices' rows, prefetched in threads; for data that do not
      fit, see :mod:`jaxtrain.engine.stream`; ``"host"`` is its earlier name) or
      ``"auto"`` (the device when the sets take under half its memory).
    steps_per_call: the most steps one compiled call runs (0: whole epochs,
      as many as take about a second, up to 4096 steps). Calls also end where
      the host must act: early stopping, histograms, checkpoints.
    devices: data-parallel devices (shard_map over the first N local devices).
    histogram_every: epochs between weight/gradient histograms (0: never).
    progress: what the run shows while it trains (process 0): ``None``: a
      tqdm bar on stderr when it is a terminal, and a line per epoch (to
      ``fit``'s ``log``, else stdout); ``True``: the bar and the lines, terminal
      or not; ``False``: neither (messages such as an early stop still print).
      :func:`jaxtrain.many.fit_many` shows none.
    accumulate_steps: micro-batches of ``batch_size`` per optimizer update
      (gradient accumulation): an update sees ``batch_size * accumulate_steps``
      examples, and steps, epochs, schedules and cadences count updates.
    conv_impl: how plain ``flax.linen.Conv`` layers of your model are computed:
      ``"auto"`` (as shifted-slice matmuls on CPU, which also loop fast, and
      ``lax.conv`` elsewhere), ``"matmul"`` or ``"xla"`` (see
      :func:`jaxtrain.conv.flax_convs`). The model and its parameters are
      unchanged either way.
    profile_steps: ``(a, b)`` or ``"a:b"``: write a ``jax.profiler`` trace of
      steps ``a + 1 .. b`` into the monitor's ``<workdir>/profile``
      (:mod:`jaxtrain.train.throughput`); not part of the run's identity.
    reduce_lr_on_plateau: PyTorch's ReduceLROnPlateau
      (:class:`jaxtrain.ReduceLROnPlateau`), stepped at every epoch end with
      its monitored evaluation mean; its state travels in ``state.plateau``.
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
  accumulate_steps: int = 1
  reduce_lr_on_plateau: ReduceLROnPlateau | None = None
  conv_impl: str = "auto"
  profile_steps: tuple[int, int] | str | None = None

  @property
  def update_batch_size(self) -> int:
    """Examples per optimizer update: ``batch_size * accumulate_steps``."""
    return self.batch_size * self.accumulate_steps


def validate(config: FitConfig, n_train: int) -> None:
  """Raises ValueError naming the first bad setting (before anything is written)."""
  def bad(name, value, why):
    raise ValueError(f"{name} {why}, got {value!r}")

  def integer(value):
    return isinstance(value, int) and not isinstance(value, bool)

  if not integer(config.epochs) or config.epochs < 1:
    bad("epochs", config.epochs, "must be an integer >= 1")
  if not integer(config.batch_size) or config.batch_size < 1:
    bad("batch_size", config.batch_size, "must be an integer >= 1")
  if not integer(config.accumulate_steps) or config.accumulate_steps < 1:
    bad("accumulate_steps", config.accumulate_steps, "must be an integer >= 1")
  if config.batch_size > n_train:
    bad("batch_size", config.batch_size, f"must not exceed the {n_train} training examples")
  if config.update_batch_size > n_train:
    bad("accumulate_steps", config.accumulate_steps,
        f"times batch_size {config.batch_size} must not exceed the {n_train} training examples")
  for name in ("eval_batch_size", "eval_every_steps", "steps_per_call", "histogram_every"):
    if getattr(config, name) < 0:
      bad(name, getattr(config, name), "must be >= 0")
  if config.nonfinite not in ("stop", "skip"):
    bad("nonfinite", config.nonfinite, "must be 'stop' or 'skip'")
  if config.data not in DATA:
    bad("data", config.data, f"must be one of {DATA}")
  if config.execution not in EXECUTIONS:
    bad("execution", config.execution, f"must be one of {EXECUTIONS}")
  if config.conv_impl not in conv.IMPLS:
    bad("conv_impl", config.conv_impl, f"must be one of {conv.IMPLS}")
  if not 1 <= config.devices <= jax.device_count():
    where = ("local devices" if jax.process_count() == 1 else
             f"devices of {jax.process_count()} processes")
    bad("devices", config.devices, f"must be in 1..{jax.device_count()} ({where})")
  if jax.process_count() > 1 and config.devices % jax.process_count():
    bad("devices", config.devices, f"must be a multiple of the {jax.process_count()} processes")
  if config.batch_size % config.devices:
    bad("batch_size", config.batch_size, f"must be divisible by the {config.devices} devices")
  profile_range(config.profile_steps)
  if config.drop_remainder and n_train < config.update_batch_size:
    bad("batch_size", config.batch_size, "with drop_remainder leaves no batch")
  steps_per_epoch = num_batches(n_train, config.update_batch_size, config.drop_remainder)
  if config.epochs * steps_per_epoch > MAX_STEPS:
    # Past it the step counter wraps: schedules, keys and checkpoints would repeat steps.
    raise ValueError(
        f"--epochs {config.epochs} makes {config.epochs * steps_per_epoch} steps "
        f"({steps_per_epoch} per epoch), more than the int32 step counter holds "
        f"(2**31 - 1 = {MAX_STEPS}); at most {MAX_STEPS // steps_per_epoch} epochs")


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """What a run does with each epoch's metrics (see :func:`plan_epochs`).

  Attributes:
    ranking: how epochs are ranked (``Position.best`` follows it).
    keep: whether the run keeps the best epoch's parameters (to restore them,
      or to checkpoint them for ``checkpoint.load(step="best")``).
    checkpoint_monitor: the column whose value each epoch-end checkpoint
      carries (Orbax keeps the best saved one too), or None.
    plateau: ``(rule, split, metric)`` of ReduceLROnPlateau, or None.
  """

  ranking: Ranking
  keep: bool
  checkpoint_monitor: str | None = None
  plateau: tuple | None = None

  def device_rule(self, evaluated):
    """The rule the compiled programs apply, when the ranked column is an
    evaluation mean; None leaves the best to the host (every epoch end)."""
    from jaxtrain.engine.best import BestRule

    if not self.keep:
      return None
    r = self.ranking
    return BestRule.for_column(r.monitor, evaluated, mode=r.mode, min_delta=r.min_delta)


def plan_epochs(config: FitConfig, checkpoint, columns, *, has_val: bool) -> EpochPlan:
  """How the run names its best epoch and steps ReduceLROnPlateau, checking
  the monitors against the metrics it logs (of metrics.csv's ``columns``: a
  ValueError names a monitor the run cannot rank or step by).

  Early stopping's monitor ranks when there is a rule; else the checkpoint's
  (``checkpoint``: a CheckpointConfig or None), its default ``val_loss``
  falling back to ``train_loss`` (then ``train_loss_running``) in a run
  without validation data; else ``val_loss``.
  """
  def logs(column):
    if column in ("epoch", "step", "seconds"):
      return False
    if column.startswith("val_"):
      return has_val
    return config.evaluate_train or column in ("train_loss_running", "train_penalty",
                                               "learning_rate")

  logged = {c for c in columns if logs(c)}
  rule = config.early_stopping
  if rule is not None and rule.monitor not in logged:
    why = ("needs validation data" if rule.monitor.startswith("val_") and not has_val
           and rule.monitor in columns else
           f"is not a metric this run logs ({', '.join(sorted(logged))})")
    raise ValueError(f"early stopping monitor {rule.monitor!r} {why}")
  monitor = None
  if checkpoint is not None:
    monitor = checkpoint.monitor
    if monitor == "val_loss" and monitor not in logged:
      monitor = "train_loss" if "train_loss" in logged else "train_loss_running"
    if monitor not in logged:
      raise ValueError(f"checkpoint monitor {checkpoint.monitor!r} is not a metric this "
                       f"run logs ({', '.join(sorted(logged))})")
  if rule is not None:
    ranking = rule.ranking
  elif monitor is not None:
    ranking = Ranking(monitor, checkpoint.mode)
  else:
    ranking = Ranking()
  keep = bool((rule is not None and rule.restore_best)
              or (checkpoint is not None and checkpoint.keep_best))
  evaluated = (["train"] if config.evaluate_train else []) + (["val"] if has_val else [])
  return EpochPlan(ranking, keep, monitor, plateau_rule(config, evaluated, columns))


def plateau_rule(config: FitConfig, evaluated, columns) -> tuple | None:
  """The ``(rule, split, metric)`` the programs step ReduceLROnPlateau with,
  or None; a ValueError names a monitor that is no evaluation mean of the run
  (metrics.csv ``columns``, ``evaluated`` sets)."""
  rule = config.reduce_lr_on_plateau
  if rule is None:
    return None
  split, _, metric = rule.monitor.partition("_")
  if rule.monitor not in columns or split not in evaluated or rule.monitor in (
      "train_loss_running",):
    means = sorted(c for c in columns if c.partition("_")[0] in evaluated
                   and c != "train_loss_running")
    raise ValueError(f"reduce_lr_on_plateau monitor {rule.monitor!r} is not an evaluation "
                     f"metric of this run ({', '.join(means) or 'no set is evaluated'})")
  return rule, split, metric


def columns(state, config: FitConfig, train, *, has_val: bool) -> tuple[str, ...]:
  """metrics.csv's columns for a run: :data:`COLUMNS` (without the accuracy
  columns when the state logs no accuracy), ``train_penalty``
  before ``learning_rate`` when the state has a penalty term, and before
  ``train_loss_running``: ``train_<name>`` / ``val_<name>`` for each metric
  of ``state.metrics_fn``, then the evaluated sets' ``<set>_ema_<metric>``
  when the state keeps a moving average of its parameters."""
  base = COLUMNS
  if getattr(state, "accuracy", None) is None:
    # Accuracy is a metric of a classification loss: none for the others.
    base = tuple(c for c in base if not c.endswith("_accuracy"))
  reg = getattr(state, "regularization", None)
  if reg is not None and reg.penalizes:
    at = base.index("learning_rate")
    base = base[:at] + ("train_penalty",) + base[at:]
  own = []
  if state.metrics_fn is not None:
    from jaxtrain.core.metrics import mean_name
    from jaxtrain.core.step import eval_step

    example = {k: v for k, v in head(train, 1).items() if k in ("inputs", "targets")}
    sums = jax.eval_shape(eval_step, state, example)
    own = [mean_name(k) for k in sums if k.endswith("_sum") and k != "loss_sum"]
  splits = (["train"] if config.evaluate_train else []) + (["val"] if has_val else [])
  added = [f"{s}_{n}" for s in splits for n in own]
  if getattr(state, "ema", None) is not None:
    accuracy = ("accuracy",) if getattr(state, "accuracy", None) is not None else ()
    added += [f"{s}_ema_{n}" for s in splits for n in ("loss", *accuracy, *own)]
  at = base.index("train_loss_running")
  return base[:at] + tuple(added) + base[at:]


def as_arrays(split: Mapping[str, Any] | Source | None, name: str):
  """A split as numpy arrays after checking it (None stays None, a
  :class:`~jaxtrain.data.Source` stays a source)."""
  if split is None:
    return None
  if isinstance(split, Source):
    if not {"inputs", "targets"} <= set(split.fields()):
      raise ValueError(f"{name} data must hold 'inputs' and 'targets', got "
                       f"{sorted(split.fields())} from {split.name}")
    return split
  check_arrays(split, 1)
  if not {"inputs", "targets"} <= set(split):
    raise ValueError(f"{name} data must hold 'inputs' and 'targets', got {sorted(split)}")
  return {k: np.asarray(v) for k, v in split.items()}


def plan_cadence(config: FitConfig, steps_per_epoch: int, checkpointer=None,
                 monitor=None, *, every_epoch: bool = False, callbacks=None) -> Cadence:
  """The run's periodic concerns: checkpoints (by steps, epochs and seconds),
  weight histograms (with a run directory's monitor; not with a
  :class:`~jaxtrain.train.progress.Progress` alone) and the early-stopping check;
  ``every_epoch`` also ends a call at every epoch end (the host keeps the
  best epoch's parameters); ``callbacks``: their concern (an
  :class:`~jaxtrain.train.cadence.AnyOf`), if any."""
  concerns = {}
  if checkpointer is not None:
    c = checkpointer.config
    concerns["checkpoint"] = Every(c.every_steps, c.every_epochs, c.every_seconds)
  if hasattr(monitor, "log_histograms") and config.histogram_every:
    concerns["histograms"] = Every(epochs=config.histogram_every)
  if config.early_stopping is not None:
    concerns["early_stopping"] = Every(epochs=1)
  if every_epoch:
    concerns["best"] = Every(epochs=1)
  if config.profile_steps is not None:
    concerns["profile"] = At(profile_range(config.profile_steps))
  if callbacks is not None:
    concerns["callbacks"] = callbacks
  return Cadence(steps_per_epoch, config.epochs * steps_per_epoch, concerns)
