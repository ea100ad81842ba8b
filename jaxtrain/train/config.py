"""How to train: :class:`FitConfig`, its checks, and what it implies for a run:
the compiled programs' :class:`~jaxtrain.engine.spec.ProgramSpec`, the
execution mode, the feed and the cadence of the host's work."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxtrain.core.plateau import ReduceLROnPlateau
from jaxtrain.data.batching import check_arrays, num_batches
from jaxtrain.engine import parallel
from jaxtrain.engine.feeds import Feed, fits_on_device, make_feed
from jaxtrain.engine.spec import ProgramSpec
from jaxtrain.nn import conv
from jaxtrain.train.cadence import Cadence, Every
from jaxtrain.train.stopping import EarlyStopping, Ranking

COLUMNS = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "train_loss_running", "learning_rate", "seconds")
EXECUTIONS = ("auto", "scan", "step")
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
    accumulate_steps: micro-batches of ``batch_size`` per optimizer update
      (gradient accumulation): an update sees ``batch_size * accumulate_steps``
      examples, and steps, epochs, schedules and cadences count updates.
    conv_impl: how plain ``flax.linen.Conv`` layers of your model are computed:
      ``"auto"`` (as shifted-slice matmuls on CPU, which also loop fast, and
      ``lax.conv`` elsewhere), ``"matmul"`` or ``"xla"`` (see
      :func:`jaxtrain.conv.flax_convs`). The model and its parameters are
      unchanged either way.
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
  if config.data not in ("auto", "device", "host"):
    bad("data", config.data, "must be 'auto', 'device' or 'host'")
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
  if config.drop_remainder and n_train < config.update_batch_size:
    bad("batch_size", config.batch_size, "with drop_remainder leaves no batch")


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
    return config.evaluate_train or column in ("train_loss_running", "learning_rate")

  logged = {c for c in columns if logs(c)}
  rule = config.early_stopping
  if rule is not None and rule.monitor not in logged:
    why = ("needs validation data" if rule.monitor.startswith("val_")
           and rule.monitor in COLUMNS else
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


def choose_execution(state, config: FitConfig, example_inputs) -> str:
  """``"scan"`` unless measurements say one straight-line step per call is faster.

  XLA:CPU runs ``lax.conv`` inside a loop several times slower than in a
  straight-line program (jax#12868; 1.03 s against 0.17 s a step in
  BENCHMARKS.md), so on CPU a model whose forward pass runs a convolution
  primitive steps one call at a time. The decision reads what the model runs
  (its forward pass on ``example_inputs``, traced as the programs trace it),
  not its attributes: jaxtrain's models, and plain ``nn.Conv`` layers under
  ``conv_impl="auto"``, compute their convolutions as matmuls on CPU and loop
  fast.
  """
  if config.execution != "auto":
    return config.execution
  if jax.default_backend() != "cpu":
    return "scan"
  if not any(np.ndim(p) == 4 for p in jax.tree.leaves(state.params)):
    return "scan"  # no convolution kernel: skip tracing the model
  with conv.flax_convs(config.conv_impl):
    jaxpr = jax.make_jaxpr(
        lambda variables, x: state.apply_fn(variables, x, **state.call_kwargs(train=False)))(
        state.variables, example_inputs)
  return "step" if _runs_primitive(jaxpr.jaxpr, "conv_general_dilated") else "scan"


def _runs_primitive(jaxpr, name: str) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in it (jit, custom_vjp, cond, ...) runs ``name``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and _runs_primitive(inner, name):
          return True
  return False


def warn_per_device_batch_norm(state, config: FitConfig, example_inputs) -> None:
  """Warns when a run on several devices has batch norm whose statistics are
  not averaged across them (the model runs no collective over the data axis),
  naming its layers: each device would then normalise by its own shard."""
  if config.devices < 2 or not state.batch_stats:
    return
  def forward(variables, x):
    return state.apply_fn(variables, x, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(0)}, **state.call_kwargs(train=True))

  jaxpr = jax.make_jaxpr(forward, axis_env=[(parallel.AXIS, config.devices)])(
      state.variables, example_inputs)
  if not _runs_primitive(jaxpr.jaxpr, "psum"):
    layers = ", ".join(sorted(state.batch_stats))
    warnings.warn(
        f"batch norm in {layers} keeps per-device statistics on {config.devices} devices: "
        f"give it axis_name=jaxtrain.parallel.AXIS ({parallel.AXIS!r}) for the "
        "statistics of the global batch", stacklevel=3)


def warn_unmasked_batch_norm(state, config: FitConfig, n_train: int) -> None:
  """Warns once when a batch-norm model without ``mask=`` will see the padding
  rows of the ragged last batch of every epoch in its statistics."""
  ragged = n_train % config.update_batch_size and not config.drop_remainder
  if ragged and state.batch_stats and not state.passes_mask:
    layers = ", ".join(sorted(state.batch_stats))
    warnings.warn(
        f"the model's __call__ takes no mask=, so its batch norm ({layers}) "
        f"counts the {config.update_batch_size - n_train % config.update_batch_size} padding "
        "rows of each "
        "epoch's last batch: accept mask= (see the README's 'Your own model'), or use "
        "drop_remainder=True", stacklevel=3)


def columns(state, config: FitConfig, train, *, has_val: bool) -> tuple[str, ...]:
  """metrics.csv's columns for a run: :data:`COLUMNS`, and ``train_<name>`` /
  ``val_<name>`` after the accuracies for each metric of ``state.metrics_fn``."""
  if state.metrics_fn is None:
    return COLUMNS
  from jaxtrain.core.metrics import mean_name
  from jaxtrain.core.step import eval_step

  example = {"inputs": train["inputs"][:1], "targets": train["targets"][:1]}
  sums = jax.eval_shape(eval_step, state, example)
  own = [mean_name(k) for k in sums if k.endswith("_sum") and k != "loss_sum"]
  splits = (["train"] if config.evaluate_train else []) + (["val"] if has_val else [])
  at = COLUMNS.index("train_loss_running")
  return COLUMNS[:at] + tuple(f"{s}_{n}" for s in splits for n in own) + COLUMNS[at:]


def as_arrays(split: Mapping[str, Any] | None, name: str):
  """A split as numpy arrays after checking it (None stays None)."""
  if split is None:
    return None
  check_arrays(split, 1)
  if not {"inputs", "targets"} <= set(split):
    raise ValueError(f"{name} data must hold 'inputs' and 'targets', got {sorted(split)}")
  return {k: np.asarray(v) for k, v in split.items()}


def program_spec(config: FitConfig, n_train: int, eval_sizes=(), best=None,
                 plateau=None) -> ProgramSpec:
  """The compiled programs' static description for a run of ``config``."""
  spe = num_batches(n_train, config.update_batch_size, config.drop_remainder)
  return ProgramSpec(
      num_train=n_train, batch_size=config.update_batch_size,
      accumulate=config.accumulate_steps,
      eval_batch_size=eval_batch_size(config, [n_train, *eval_sizes]),
      drop_remainder=config.drop_remainder, nonfinite=config.nonfinite,
      eval_every=config.eval_every_steps, best=best, plateau=plateau,
      conv_impl=config.conv_impl,
      max_steps=config.steps_per_call or spe * max(1, MAX_SPAN_STEPS // spe))


def eval_batch_size(config: FitConfig, sizes) -> int:
  """Evaluation batches: at least the training batch, no larger than the largest
  set, divisible by the devices."""
  size = config.eval_batch_size or max(config.batch_size, 1024)
  size = min(size, max(sizes))  # never pad a small set to a huge batch
  return -(-size // config.devices) * config.devices


def plan_cadence(config: FitConfig, steps_per_epoch: int, checkpointer=None,
                 monitor=None, *, every_epoch: bool = False) -> Cadence:
  """The run's periodic concerns: checkpoints (by steps, epochs and seconds),
  weight histograms (with a monitor) and the early-stopping check;
  ``every_epoch`` also ends a call at every epoch end (the host keeps the
  best epoch's parameters)."""
  concerns = {}
  if checkpointer is not None:
    c = checkpointer.config
    concerns["checkpoint"] = Every(c.every_steps, c.every_epochs, c.every_seconds)
  if monitor is not None and config.histogram_every:
    concerns["histograms"] = Every(epochs=config.histogram_every)
  if config.early_stopping is not None:
    concerns["early_stopping"] = Every(epochs=1)
  if every_epoch:
    concerns["best"] = Every(epochs=1)
  return Cadence(steps_per_epoch, config.epochs * steps_per_epoch, concerns)


def plan_feed(state, train, config: FitConfig, *, val=None, test=None, augment=None,
              epochs: EpochPlan | None = None) -> Feed:
  """The feed (and so the compiled programs) a run of ``config`` trains through:
  on the device or streamed from the host, over ``config.devices`` devices, in
  the execution mode :func:`choose_execution` picks, with the epoch-end work
  ``epochs`` plans (the best epoch's parameters, ReduceLROnPlateau) on the device."""
  mesh = (parallel.local_mesh(parallel.run_devices(config.devices))
          if config.devices > 1 else None)
  evals = {"train": train} if config.evaluate_train else {}
  if val is not None:
    evals["val"] = val
  spec = program_spec(config, len(train["targets"]),
                      [len(s["targets"]) for s in (val, test) if s],
                      best=epochs.device_rule(evals) if epochs is not None else None,
                      plateau=epochs.plateau if epochs is not None else None)
  on_device = config.data == "device" or (config.data == "auto" and fits_on_device(train, val))
  execution = choose_execution(state, config, train["inputs"][:1])
  warn_per_device_batch_norm(state, config, train["inputs"][:1])
  warn_unmasked_batch_norm(state, config, len(train["targets"]))
  return make_feed(spec, train, evals, on_device=on_device, augment=augment, mesh=mesh,
                   step_evals=bool(config.eval_every_steps), straight=execution == "step")
