"""Timing helpers of the ``benchmarks.run`` workers: wall time of one run, a
run's first/second/steady repetitions, a matmul peak reference, compilations
and peak RSS.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

from benchmarks.workloads import MATMUL_N


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events)."""

  def __init__(self):
    import jax
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def timed(fn: Callable[..., Any], setup: Callable[[], Any] | None = None) -> float:
  """Seconds of ``fn()``, or of ``fn(setup())`` with ``setup`` untimed.

  ``setup`` builds the fresh model and optimizer state a run trains from: every
  row times training, not parameter initialisation (for the 1.9M-parameter MLP
  that is ~12 ms of threefry draws, 3% of its run).
  """
  import jax
  args = () if setup is None else (jax.block_until_ready(setup()),)
  started = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - started


def matmul_timer():
  """Returns ``measure()`` -> seconds of one 2048^3 float32 matmul (min of 3)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (MATMUL_N, MATMUL_N), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))

  def measure():
    return min(timed(lambda: matmul(a, b)) for _ in range(3))

  return measure


def repeat(run, repeats: int, between=None, setup=None) -> dict:
  """First run, second run, then ``repeats`` more (``between()`` before each);
  ``run(setup())`` with the setup untimed when ``setup`` is given."""
  first = timed(run, setup)
  second = timed(run, setup)
  times, extra = [], []
  for _ in range(repeats):
    if between is not None:
      extra.append(between())
    times.append(timed(run, setup))
  return {"first_s": first, "second_s": second, "times": times, "between": extra}
