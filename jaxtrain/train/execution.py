"""``execution="auto"``: many steps per compiled call (``"scan"``) or one
straight-line step per call (``"step"``), by a cost model and, where it is in
doubt, a measurement.

The cost model: a program whose step runs no convolution primitive loops at
least as fast as it steps (a loop saves the per-call dispatch and copies; the
benchmarks' MLP, CNN, NNX and ResNet-18 rows measure it, BENCHMARKS.md), so it
scans. jaxtrain's models, and plain ``nn.Conv``/``nnx.Conv`` layers under
``conv_impl="auto"``, compute their convolutions as matmuls on CPU, and scan.
What the model runs is read from its forward pass, traced as the programs trace
it, once per model, shapes and ``conv_impl``.

In doubt: a forward pass that still runs ``lax.conv`` on CPU (dilated, grouped,
1-D or 3-D convolutions, or ``conv_impl="xla"``). XLA:CPU runs some of those
several times slower inside a loop (jax#12868: 85 vs 8.4 ms a step on the NNX
tutorial's CNN) and others not, so ``fit`` measures: the training step under
``jax.jit`` called per step, against the same steps in a ``lax.fori_loop``, both
compiled as ``fit`` compiles its programs and timed on one batch of the run's
data (:func:`measure`). ``"step"`` wins only when it is at least
:data:`MARGIN` times faster: two programs that run alike keep ``"scan"``
whatever the load at the moment.

Scan and step agree to float rounding, not bit for bit, on convolutional
models, so the pick is part of a run's numbers: it is kept per program
signature in this process and, when JAX's persistent compilation cache is on
(every ``python -m experiments...`` run), in ``executions.json`` beside the
compiled programs, so the next process (a resumed run) takes the same pick
instead of measuring again. A run of several processes uses the cost model alone
(each process would measure its own times). Pin ``execution`` to be independent
of both.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import re
import statistics
import threading
import time

import jax
import numpy as np

try:
  import fcntl
except ImportError:  # not POSIX: the last writer wins
  fcntl = None

from jaxtrain.nn import conv
from jaxtrain.nn.cpu_random import fast_random_bits
from jaxtrain.train.config import FitConfig

MARGIN = 1.2  # "step" must be this many times faster than "scan" to be picked
MEASURED_STEPS = 3  # steps per timed round of each program
_ROUNDS = 3  # timed rounds, alternating; the median counts

# explain()'s answers by program signature (the most recent few).
_EXECUTIONS: collections.OrderedDict = collections.OrderedDict()


def choose_execution(state, config: FitConfig, example_inputs, batch=None) -> str:
  """``config.execution``, or for ``"auto"`` the pick of :func:`explain`.

  ``batch`` (``{"inputs", "targets"}``, one training batch, or a function that
  reads it, called only if a measurement is needed): what a measurement runs
  on; without one, a doubtful model steps (``lax.conv`` in a loop is the known
  slow case).
  """
  if config.execution != "auto":
    return config.execution
  return explain(state, config, example_inputs, batch)["pick"]


def explain(state, config: FitConfig, example_inputs, batch=None) -> dict:
  """How ``execution="auto"`` decides for this model and data.

  Returns:
    ``{"pick": "scan" | "step", "by": "backend" | "cost model" | "measured" |
    "cache"}``, and for a measurement the milliseconds a step of each
    (``"step_ms"``, ``"scan_ms"``).
  """
  if jax.default_backend() != "cpu":
    return {"pick": "scan", "by": "backend"}
  if not any(np.ndim(p) == 4 for p in jax.tree.leaves(state.params)):
    return {"pick": "scan", "by": "cost model"}  # no convolution kernel: nothing traced
  leaves = jax.tree.leaves(state.variables)
  key = (state.model, jax.tree.structure(state.variables), config.conv_impl,
         config.batch_size, config.devices, batch is not None,
         tuple((np.shape(v), str(getattr(v, "dtype", type(v)))) for v in (*leaves, example_inputs)))
  if key not in _EXECUTIONS:  # tracing a ResNet-18 takes ~0.15 s: once per setup
    _EXECUTIONS[key] = _decide(state, config, example_inputs, batch)
    while len(_EXECUTIONS) > 64:
      _EXECUTIONS.popitem(last=False)
  return _EXECUTIONS[key]


def _decide(state, config: FitConfig, example_inputs, batch) -> dict:
  jaxpr = _forward_jaxpr(state, config, example_inputs)
  if not runs_primitive(jaxpr.jaxpr, "conv_general_dilated"):
    return {"pick": "scan", "by": "cost model"}
  if batch is None or jax.process_count() > 1:
    return {"pick": "step", "by": "cost model"}
  signature = hashlib.sha256("\n".join(map(str, (
      jax.__version__, jax.devices()[0].device_kind, config.conv_impl, config.devices,
      config.batch_size, config.accumulate_steps, jax.tree.structure(state.opt_state),
      np.shape(example_inputs)[1:], jax.tree.map(np.shape, state.variables),
      _printed(jaxpr)))).encode()).hexdigest()[:32]
  stored = _stored().get(signature)
  if stored in ("scan", "step"):
    return {"pick": stored, "by": "cache"}
  times = measure(state, config, batch() if callable(batch) else batch)
  pick = "step" if times["scan_ms"] >= MARGIN * times["step_ms"] else "scan"
  _store(signature, pick)
  return {"pick": pick, "by": "measured", **times}


def _printed(jaxpr) -> str:
  """The jaxpr as text, the same in every process: no object addresses, no
  equations whose results are all dropped (a trace may keep a stray one)."""
  text = re.sub(r" at 0x[0-9a-f]+", "", str(jaxpr))
  return "\n".join(line for line in text.splitlines()
                   if not re.match(r"^\s*(_:\S+\s+)+= ", line))


def _forward_jaxpr(state, config: FitConfig, example_inputs):
  model = state.model

  def forward(variables, x):
    return model.apply(variables, x, train=False,
                       rngs=model.rngs(None, variables, x, train=False))[0]

  with conv.flax_convs(config.conv_impl):
    return jax.make_jaxpr(forward)(state.variables, example_inputs)


def runs_primitive(jaxpr, name: str) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in it (jit, custom_vjp, cond, ...) runs ``name``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and runs_primitive(inner, name):
          return True
  return False


def measure(state, config: FitConfig, batch, steps: int = MEASURED_STEPS) -> dict:
  """Milliseconds a training step takes called once per step (``"step_ms"``)
  and inside a ``lax.fori_loop`` of ``steps`` (``"scan_ms"``), on ``batch``
  (its first ``batch_size / devices`` rows: one device's share; with gradient
  accumulation one micro-batch, the part the two programs run alike), compiled
  as ``fit`` compiles its programs; the median of a few alternating rounds.
  """
  from jaxtrain.core.step import train_step

  rows = max(1, config.batch_size // config.devices)
  batch = {k: jax.device_put(np.asarray(v)[:rows]) for k, v in batch.items()}
  key = jax.random.key(0)

  def one(s, k):
    return train_step(s, batch, k)[0]

  def loop(s):
    return jax.lax.fori_loop(
        0, steps, lambda i, s: train_step(s, batch, jax.random.fold_in(key, i))[0], s)

  with conv.flax_convs(config.conv_impl), fast_random_bits():
    stepped = jax.jit(one).lower(state, key).compile()
    looped = jax.jit(loop).lower(state).compile()

  def run_stepped():
    s = state
    for i in range(steps):
      s = stepped(s, jax.random.fold_in(key, i))
    return s

  times = {"step_ms": [], "scan_ms": []}
  for round_ in range(_ROUNDS + 1):  # the first round: warm-up
    for name, run in (("step_ms", run_stepped), ("scan_ms", lambda: looped(state))):
      start = time.perf_counter()
      jax.block_until_ready(run())
      if round_:
        times[name].append((time.perf_counter() - start) * 1e3 / steps)
  return {name: statistics.median(values) for name, values in times.items()}


def _store_path() -> pathlib.Path | None:
  directory = jax.config.jax_compilation_cache_dir
  return pathlib.Path(directory) / "executions.json" if directory else None


def _stored() -> dict:
  path = _store_path()
  try:
    return json.loads(path.read_text()) if path is not None else {}
  except (OSError, ValueError):
    return {}  # none yet, or unreadable: measure


def _store(signature: str, pick: str) -> None:
  path = _store_path()
  if path is None:
    return
  try:
    # Runs sharing a cache (a sweep's members) add their picks one at a time.
    with open(path.with_name("executions.lock"), "a") as lock:
      if fcntl is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
      picks = {**_stored(), signature: pick}
      tmp = path.with_name(f".executions.{os.getpid()}.{threading.get_ident()}.tmp")
      tmp.write_text(json.dumps(picks, indent=1, sort_keys=True))
      os.replace(tmp, path)
  except OSError:
    pass  # a read-only cache: the pick holds for this process
