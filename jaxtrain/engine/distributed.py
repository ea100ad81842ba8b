"""Several processes, one run: ``jax.distributed`` set-up and the agreements
the processes' drivers need.

Every process runs the same ``fit``; the programs' collectives span all
processes' devices (gloo on CPU, NCCL on GPU). What the host decides between
calls (where the next call ends, whether to fetch, save, stop) must be the
same everywhere, or the processes would call different programs and wait on
each other forever, or pair the bytes of different collectives. :func:`agree`
combines each process's proposal into one answer: one small all-gather per
agreement (nothing at all in a single process).

What travels has one form whatever the values: every value is a float64 sent
as the two int32 halves of its bits (JAX without x64 moves int32 exactly and
has no 64-bit type), after one int32 word naming the agreement. So a value
never changes the message's dtype or length (an earlier version sent int32
when a process's values were whole numbers and float32 otherwise: a save due
by time, sent as 1e18, overflowed int32, and each process read the other's
bytes as its own type), every float64 (1e18, 2**40, inf) comes back exactly,
and two processes at different agreements fail loudly instead of reading
each other's words. :func:`encode`, :func:`decode` and :func:`combine` are
pure functions, testable without processes.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence

import numpy as np

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process run (all unset: one process).

  Attributes:
    coordinator: ``HOST:PORT`` of process 0's coordination service
      (default: ``$JAX_COORDINATOR_ADDRESS``).
    num_processes: processes in the run (default: ``$JAX_NUM_PROCESSES``).
    process_id: this process's rank, 0-based (default: ``$JAX_PROCESS_ID``).
    auto: let ``jax.distributed.initialize()`` detect the cluster (SLURM,
      Open MPI, Kubernetes) from its environment.
    heartbeat_seconds: a process not heard from for this long is lost: the
      others end with an error naming it instead of waiting forever.
  """

  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  heartbeat_seconds: int = 100

  def __post_init__(self):
    # Checked as the flags are parsed, one process or several: a value no run
    # can mean is refused before anything starts.
    def integer(value):
      return isinstance(value, int) and not isinstance(value, bool)

    if not integer(self.heartbeat_seconds) or self.heartbeat_seconds < 1:
      raise ValueError("--distributed.heartbeat-seconds must be a whole number of seconds "
                       f">= 1, got {self.heartbeat_seconds!r}")
    if self.num_processes is not None and (not integer(self.num_processes)
                                           or self.num_processes < 1):
      raise ValueError(f"--distributed.num-processes must be >= 1, got {self.num_processes!r}")

  def resolved(self) -> DistributedConfig:
    """The config with the ``JAX_*`` variables filling what is unset."""
    env = dict(zip(("coordinator", "num_processes", "process_id"),
                   (os.environ.get(name) for name in ENV)))
    values = {}
    for name, raw in env.items():
      value = getattr(self, name)
      if value is None and raw not in (None, ""):
        variable = ENV[list(env).index(name)]
        try:
          value = raw if name == "coordinator" else int(raw)
        except ValueError:
          raise ValueError(f"${variable} must be an integer, got {raw!r}") from None
        if name == "num_processes" and value < 1:
          raise ValueError(f"${variable} must be >= 1, got {raw!r}")
      values[name] = value
    return dataclasses.replace(self, **values)

  @property
  def enabled(self) -> bool:
    """Whether this config asks for a multi-process run at all."""
    return self.auto or self.num_processes is not None or self.coordinator is not None


def initialize(config: DistributedConfig | None = None) -> bool:
  """Joins the run described by ``config`` (and the ``JAX_*`` variables);
  call it before any JAX computation. Returns whether this is a multi-process
  run. On CPU the cross-process collectives are gloo. SIGTERM stays with the
  process's own handler: JAX's preemption service, which would take it, is
  off (``jaxtrain.run.run`` stops every process at the same step instead).

  >>> initialize(DistributedConfig())  # nothing set: one process, nothing done
  False
  """
  config = (config or DistributedConfig()).resolved()
  if not config.enabled:
    return False
  if not config.auto:
    missing = [f"--distributed.{n.replace('_', '-')}" for n in
               ("coordinator", "num_processes", "process_id") if getattr(config, n) is None]
    if missing:
      raise ValueError(f"a multi-process run needs {', '.join(missing)} (or $"
                       + ", $".join(ENV) + ")")
    if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
      raise ValueError(f"--distributed.process-id must be in 0..{config.num_processes - 1} "
                       f"for {config.num_processes} processes, got {config.process_id}")
  import jax

  from jaxtrain.launch import unblock_stop_signals

  unblock_stop_signals()  # blocked by jaxtrain.launch until now (pending ones arrive)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's preemption notifier would take SIGTERM from whatever handler is
  # installed (jaxtrain's run answers it, agreed across the processes at its
  # next call boundary); a SIGTERM it caught would be lost to the run.
  jax.config.update("jax_enable_preemption_service", False)
  if config.auto:
    jax.distributed.initialize(heartbeat_timeout_seconds=config.heartbeat_seconds)
  else:
    jax.distributed.initialize(config.coordinator, num_processes=config.num_processes,
                               process_id=config.process_id,
                               heartbeat_timeout_seconds=config.heartbeat_seconds)
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  import jax

  return jax.process_index() == 0


_HALF = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)
_EXACT = 2 ** 53  # integers up to here are exact in float64


def encode(values, *, tag: int = 0) -> np.ndarray:
  """``values`` (a 1-D sequence of numbers) as int32 words: ``tag`` first, then
  each value as float64 in two words (the high and low halves of its bits).
  The dtype is always int32 and the length ``1 + 2 * len(values)``.

  >>> encode([2.0, 1e18], tag=7)[:3].tolist()  # 2.0 is 0x40000000_00000000
  [7, 1073741824, 0]
  >>> encode([2.0, 1e18]).dtype, encode([2.5, 3]).shape
  (dtype('int32'), (5,))
  """
  for v in values:
    if isinstance(v, int | np.integer) and abs(int(v)) > _EXACT:
      raise ValueError(f"{v} is not exact as float64: agree integers up to 2**53")
  bits = np.asarray(values, np.float64).reshape(-1).view(np.uint64)
  halves = np.stack([bits >> _HALF, bits & _LOW], axis=-1).astype(np.uint32)
  return np.concatenate([np.asarray([tag], np.int32), halves.view(np.int32).reshape(-1)])


def decode(words) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of :func:`encode`, also for a stack of messages (one row per
  process): ``(tags, values)``, float64 values bit for bit as sent.

  >>> tag, values = decode(encode([2 ** 40, -3], tag=1))
  >>> int(tag), values.tolist()
  (1, [1099511627776.0, -3.0])
  """
  words = np.asarray(words)
  if words.dtype != np.int32 or words.shape[-1] % 2 != 1:
    raise ValueError(f"not an encoded message: {words.dtype} words of shape {words.shape}")
  halves = words[..., 1:].view(np.uint32).astype(np.uint64)
  halves = halves.reshape(words.shape[:-1] + (-1, 2))
  return words[..., 0], ((halves[..., 0] << _HALF) | halves[..., 1]).view(np.float64)


def combine(rows, how: str | Sequence[str]) -> list[float]:
  """One answer from the processes' ``rows`` (processes x values): per value
  the ``"min"`` or ``"max"`` over the processes (``how``: one for all values,
  or one per value).

  >>> combine([[3, 0, 1e18], [5, 1, 2.5]], ("min", "max", "max"))
  [3.0, 1.0, 1e+18]
  """
  rows = np.asarray(rows, np.float64)
  hows = [how] * rows.shape[-1] if isinstance(how, str) else list(how)
  if len(hows) != rows.shape[-1] or not set(hows) <= {"min", "max"}:
    raise ValueError(f"how must be 'min' or 'max' per value, got {how!r} for "
                     f"{rows.shape[-1]} values")
  return [float(rows[:, i].min() if h == "min" else rows[:, i].max())
          for i, h in enumerate(hows)]


def agree(values, how: str | Sequence[str], *, name: str = "") -> list[float]:
  """The processes' common answer from each one's ``values`` (a 1-D sequence
  of numbers, the same length everywhere): per value the ``"min"`` or
  ``"max"`` over the processes (see :func:`combine`). ``name`` names the
  agreement: processes that reach different agreements raise instead of
  combining each other's values. In one process, ``values`` as float64.

  >>> agree([3, 1.5], "min")
  [3.0, 1.5]
  """
  import jax

  hows = (how,) if isinstance(how, str) else tuple(how)
  if jax.process_count() == 1:  # nothing to agree: each call boundary asks (a fast path)
    if len(hows) not in (1, len(values)) or not set(hows) <= {"min", "max"}:
      raise ValueError(f"how must be 'min' or 'max' per value, got {how!r} for "
                       f"{len(values)} values")
    for v in values:
      if isinstance(v, int | np.integer) and abs(int(v)) > _EXACT:
        raise ValueError(f"{v} is not exact as float64: agree integers up to 2**53")
    return [float(v) for v in values]
  tag = zlib.crc32(f"{name}:{len(values)}:{','.join(hows)}".encode()) & 0x7FFFFFFF
  words = encode(values, tag=tag)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    words = np.asarray(multihost_utils.process_allgather(words))
    if words.dtype != np.int32:  # nothing here casts; a collective that did would garble
      raise RuntimeError(f"agree {name!r}: the all-gather returned {words.dtype}, not int32")
  tags, rows = decode(words.reshape(-1, words.shape[-1]))
  if (tags != tag).any():
    raise RuntimeError(f"the processes are at different agreements (tags {tags.tolist()}; "
                       f"this one is {name!r} with {len(values)} values): their drivers "
                       "took different paths")
  return combine(rows, how)
