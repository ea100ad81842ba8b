"""Throughput of a run, and traces of chosen steps.

Each epoch row logged to a monitor also carries ``examples_per_second``
(training examples over the epoch's ``seconds``, evaluations included; the
first epoch's includes compiling), ``flops_per_second`` (the achieved
floating-point rate of training: FLOPs of one update from XLA's cost analysis
of :func:`jaxtrain.train_step` on the run's batch shapes, times the epoch's
updates, over its seconds) and, on a device whose peak this module knows,
``peak_fraction`` (that rate over the peak of the devices in use). They go to
TensorBoard (``epoch/...``) and the epoch line; metrics.csv keeps ``seconds``
as its only timing column, so that reruns compare byte for byte but for it.

``FitConfig(profile_steps=(a, b))`` (flag ``--profile-steps A:B``) writes a
``jax.profiler`` trace of steps ``a + 1 .. b`` into ``<run directory>/profile``,
which TensorBoard's profile plugin and Perfetto open.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.state import TrainState
from jaxtrain.core.step import train_step
from jaxtrain.data.indexed import head

# Dense peak FLOP/s of one chip, from the vendors' datasheets: (float32 as XLA
# computes it by default, bfloat16/float16). float32 matmuls run as TF32 on
# these GPUs and as bfloat16 passes on TPUs (JAX's default precision).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (494.7e12, 989.4e12),
    "NVIDIA H100 PCIe": (378e12, 756e12),
    "NVIDIA H200": (494.7e12, 989.4e12),
    "NVIDIA A100-SXM4-40GB": (156e12, 312e12),
    "NVIDIA A100-SXM4-80GB": (156e12, 312e12),
    "NVIDIA A100 80GB PCIe": (156e12, 312e12),
    "NVIDIA A100-PCIE-40GB": (156e12, 312e12),
    "NVIDIA L4": (60e12, 121e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
}


def peak_flops(device_kind: str, precision: str = "fp32") -> float | None:
  """One chip's dense peak FLOP/s for ``precision``, or None when unknown.

  >>> peak_flops("NVIDIA H200", "bf16"), peak_flops("cpu")
  (989400000000000.0, None)
  """
  peaks = PEAK_FLOPS.get(device_kind)
  return None if peaks is None else peaks[precision != "fp32"]


def step_flops(state: TrainState, example: Mapping[str, np.ndarray], batch_size: int
               ) -> float | None:
  """FLOPs of one :func:`~jaxtrain.train_step` on ``batch_size`` rows shaped as
  ``example`` (a batch of any size), by XLA's cost analysis of the lowered
  step (nothing is compiled or run); None where the backend gives none."""
  def spec(x):
    x = np.asarray(x)
    return jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype)

  # The same run asks twice (its summary, its throughput): lowered once.
  key = (jax.tree.structure(state), batch_size, *(
      (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)),
      *((np.shape(example[k])[1:], np.asarray(example[k]).dtype) for k in ("inputs", "targets")))
  if key not in _STEP_FLOPS:
    if len(_STEP_FLOPS) > 64:
      _STEP_FLOPS.clear()
    _STEP_FLOPS[key] = _lowered_flops(state, {k: spec(example[k]) for k in ("inputs", "targets")},
                                      batch_size)
  return _STEP_FLOPS[key]


_STEP_FLOPS: dict = {}


def _lowered_flops(state: TrainState, example, batch_size: int) -> float | None:
  batch = {**example, "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
  from jaxtrain.engine.parallel import AXIS, P, on_one_device

  step = on_one_device(train_step, (P(), P(AXIS), P()))
  # Shapes only: the run's arrays may be placed on other devices.
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), state)
  return lowered_flops(step, shapes, batch, jax.random.key(0))


def lowered_flops(fn, *args) -> float | None:
  """FLOPs of ``fn`` (jitted) on ``args`` by XLA's cost analysis of the
  lowered program (nothing compiled or run); None where the backend gives none."""
  try:
    cost = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).cost_analysis()
  except NotImplementedError:
    return None
  if isinstance(cost, list | tuple):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What an epoch's seconds turn into rates with.

  >>> t = Throughput(examples_per_epoch=600, steps_per_epoch=10, flops_per_step=2e6,
  ...                peak=1e9)
  >>> t.rates(0.5)
  {'examples_per_second': 1200.0, 'flops_per_second': 40000000.0, 'peak_fraction': 0.04}
  """

  examples_per_epoch: int
  steps_per_epoch: int
  flops_per_step: float | None = None
  peak: float | None = None  # the devices' total

  @classmethod
  def measure(cls, state: TrainState, example: Mapping[str, np.ndarray], *,
              batch_size: int, accumulate_steps: int, examples_per_epoch: int,
              steps_per_epoch: int, devices) -> Throughput:
    """The throughput of a run of ``state`` (its FLOPs per update measured)."""
    flops = step_flops(state, example, batch_size)
    peak = peak_flops(devices[0].device_kind, state.precision) if devices else None
    return cls(examples_per_epoch, steps_per_epoch,
               None if flops is None else flops * accumulate_steps,
               None if peak is None else peak * len(devices))

  def rates(self, seconds: float | None) -> dict[str, float]:
    """``examples_per_second`` and, where known, ``flops_per_second`` and
    ``peak_fraction`` of an epoch that took ``seconds``."""
    if not seconds or seconds <= 0:
      return {}
    out = {"examples_per_second": self.examples_per_epoch / seconds}
    if self.flops_per_step is not None:
      out["flops_per_second"] = self.flops_per_step * self.steps_per_epoch / seconds
      if self.peak:
        out["peak_fraction"] = out["flops_per_second"] / self.peak
    return out


def profile_range(value) -> tuple[int, int] | None:
  """``"A:B"`` or ``(A, B)`` as a checked ``(A, B)`` with ``0 <= A < B``; None stays.

  >>> profile_range("10:20"), profile_range(None)
  ((10, 20), None)
  """
  if value is None:
    return None
  try:
    first, last = (value.split(":") if isinstance(value, str) else value)
    first, last = int(first), int(last)
  except (TypeError, ValueError):
    first = last = -1
  if not 0 <= first < last:
    raise ValueError(f"--profile-steps must be A:B with integers 0 <= A < B (trace steps "
                     f"A+1..B), got {value!r}")
  return first, last


def measure_run(state: TrainState, train, config, spec, devices) -> Throughput:
  """:meth:`Throughput.measure` for a run of ``config`` (a FitConfig) on ``train``."""
  return Throughput.measure(state, head(train, 1), batch_size=config.batch_size,
                            accumulate_steps=config.accumulate_steps,
                            examples_per_epoch=spec.num_train,
                            steps_per_epoch=spec.steps_per_epoch, devices=devices)


class Profile:
  """Starts a ``jax.profiler`` trace where a call begins at step ``first`` and
  stops it once the call ending at step ``last`` has run (no steps: does nothing);
  in a multi-process run, process 0's."""

  def __init__(self, steps: tuple[int, int] | None = None):
    self.first, self.last = steps or (-1, -1)
    self.directory = None
    self.active = False

  @classmethod
  def plan(cls, config, total_steps: int, monitor) -> Profile:
    """The profile ``config.profile_steps`` asks for, checked against the run."""
    steps = profile_range(config.profile_steps)
    if steps is not None and steps[1] > total_steps:
      raise ValueError(f"--profile-steps {steps[0]}:{steps[1]} ends past the run's "
                       f"{total_steps} steps")
    if steps is not None and monitor is None:
      raise ValueError("--profile-steps needs a run directory (a monitor) for its trace")
    return cls(steps)

  def before(self, step: int, monitor) -> None:
    # Process 0 traces (its monitor writes the run directory); a process
    # without one (the others of a multi-process run) does not.
    workdir = getattr(monitor, "workdir", None)
    if step == self.first and not self.active and workdir is not None:
      self.directory = os.path.join(workdir, "profile")
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs, say) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.stop()
      say(f"profile of steps {self.first + 1}..{self.last} -> {self.directory}")

  def stop(self) -> None:
    if self.active:
      self.active = False
      try:
        jax.profiler.stop_trace()
      except RuntimeError as error:  # the trace could not be written
        warnings.warn(f"the profile in {self.directory} was not written: {error}",
                      stacklevel=2)
