"""Several processes, one run: ``jax.distributed`` set-up and the agreements
the processes' drivers need.

Every process runs the same ``fit``; the programs' collectives span all
processes' devices (gloo on CPU, NCCL on GPU). What the host decides between
calls (where the next call ends, whether to save, whether a signal stops the
run) must be the same everywhere, or the processes would call different
programs and wait on each other forever: :func:`agree` combines each
process's proposal into one answer (one small all-gather per call boundary;
nothing at all in a single process).
"""

from __future__ import annotations

import dataclasses
import os

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

  def resolved(self) -> DistributedConfig:
    """The config with the ``JAX_*`` variables filling what is unset."""
    env = dict(zip(("coordinator", "num_processes", "process_id"),
                   (os.environ.get(name) for name in ENV)))
    values = {}
    for name, raw in env.items():
      value = getattr(self, name)
      if value is None and raw not in (None, ""):
        try:
          value = raw if name == "coordinator" else int(raw)
        except ValueError:
          raise ValueError(f"${ENV[list(env).index(name)]} must be an integer, "
                           f"got {raw!r}") from None
      values[name] = value
    return dataclasses.replace(self, **values)

  @property
  def enabled(self) -> bool:
    return self.auto or self.num_processes is not None or self.coordinator is not None


def initialize(config: DistributedConfig | None = None) -> bool:
  """Joins the run described by ``config`` (and the ``JAX_*`` variables);
  call it before any JAX computation. Returns whether this is a multi-process
  run. On CPU the cross-process collectives are gloo.

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

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def agree(values, how: str):
  """The processes' common answer from each one's ``values`` (a 1-D sequence
  of numbers): elementwise ``"min"`` or ``"max"`` over the processes. In one
  process, ``values`` unchanged.

  >>> agree([3, 1.5], "min")
  [3.0, 1.5]
  """
  import jax

  local = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return local.tolist()
  from jax.experimental import multihost_utils

  # Without x64, JAX moves int32 and float32: whole numbers (steps) as int32.
  whole = all(float(v).is_integer() for v in local)
  gathered = np.asarray(multihost_utils.process_allgather(
      local.astype(np.int32 if whole else np.float32)))
  combined = gathered.min(axis=0) if how == "min" else gathered.max(axis=0)
  return combined.astype(np.float64).tolist()
