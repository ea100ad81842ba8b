"""A model summary: parameters per module, totals, and FLOPs per step.

:func:`summary` reads a :class:`~jaxtrain.TrainState` (Linen or NNX: both
keep their parameters as a nested dict by module path) and asks XLA's cost
analysis for the FLOPs of the forward pass and of one
:func:`~jaxtrain.train_step` on the given batch shapes. Nothing is compiled
or run: the programs are only lowered, so it costs about as much as tracing
them once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.state import TrainState
from jaxtrain.train.throughput import lowered_flops, step_flops


@dataclasses.dataclass(frozen=True)
class ModuleSummary:
  """One module's own variables (its submodules have rows of their own).

  Attributes:
    path: the module's path in the parameter tree (``"Conv_0"``,
      ``"blocks/0/attention"``; ``""`` for variables of the top module).
    params: ``{name: shape}`` of its parameters.
    count: its parameters' values.
    bytes: their bytes as stored.
    batch_stats: its batch statistics' values (batch norm's running mean and
      variance), kept beside the parameters, never trained by the optimizer.
  """

  path: str
  params: Mapping[str, tuple[int, ...]]
  count: int
  bytes: int
  batch_stats: int = 0


@dataclasses.dataclass(frozen=True)
class Summary:
  """What :func:`summary` returns; ``str()`` of it is a table.

  Attributes:
    modules: one :class:`ModuleSummary` per module holding variables, in
      parameter-tree order.
    params: parameter values in all (what the optimizer trains).
    param_bytes: their bytes.
    batch_stats: batch-statistic values in all.
    optimizer_bytes: bytes of the optimizer's state (Adam's two moments: twice
      ``param_bytes``).
    batch_size: the batch the FLOPs are for.
    forward_flops: FLOPs of the forward pass in evaluation mode on
      ``batch_size`` examples (XLA's count; None where the backend gives none).
    step_flops: FLOPs of one training step (forward, backward, optimizer
      update) on ``batch_size`` examples; None without example targets.
  """

  modules: tuple[ModuleSummary, ...]
  params: int
  param_bytes: int
  batch_stats: int
  optimizer_bytes: int
  batch_size: int
  forward_flops: float | None
  step_flops: float | None

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict (config.json keeps it under ``"summary"``)."""
    out = dataclasses.asdict(self)
    out["modules"] = [{**m, "params": {k: list(v) for k, v in m["params"].items()}}
                      for m in out["modules"]]
    return out

  def __str__(self) -> str:
    rows = [("module", "parameters", "count", "bytes")]
    for m in self.modules:
      shapes = ", ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in m.params.items())
      stats = f" (+{m.batch_stats:,} batch stats)" if m.batch_stats else ""
      rows.append((m.path or "(top)", shapes + stats, f"{m.count:,}", _size(m.bytes)))
    rows.append(("total", f"{len(self.modules)} modules", f"{self.params:,}",
                 _size(self.param_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, lines[1])
    lines.append(f"batch statistics {self.batch_stats:,}; optimizer state "
                 f"{_size(self.optimizer_bytes)}")
    flops = [f"{name} {_flops(v)}" for name, v in (("forward", self.forward_flops),
                                                   ("training step", self.step_flops))
             if v is not None]
    if flops:
      lines.append(f"FLOPs per batch of {self.batch_size}: " + "; ".join(flops))
    return "\n".join(lines)


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError


def _flops(v: float) -> str:
  for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
    if v >= scale:
      return f"{v / scale:.3g} {unit}"
  return f"{v:.0f} FLOP"


def _leaves_by_module(tree) -> dict[str, dict[str, Any]]:
  """``{module path: {name: leaf}}`` of a nested dict of arrays."""
  out: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    out.setdefault("/".join(keys[:-1]), {})[keys[-1] if keys else ""] = leaf
  return out


def _nbytes(leaf) -> int:
  return int(np.prod(jnp.shape(leaf), dtype=np.int64)) * jnp.result_type(leaf).itemsize


def summary(state: TrainState, example_inputs, example_targets=None, *,
            batch_size: int | None = None) -> Summary:
  """Parameters per module, totals and FLOPs of ``state``'s model.

  Args:
    state: a TrainState (from :func:`~jaxtrain.create_train_state`), of a Linen
      or an NNX model.
    example_inputs: a batch of inputs (only its shapes and dtypes are used;
      the leading axis is the batch).
    example_targets: the matching targets; with them, the FLOPs of one
      training step too.
    batch_size: the batch the FLOPs are counted for (default: the examples'
      leading axis).

  Returns:
    A :class:`Summary`; print it for a table.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(16,), outputs=2),
  ...     jaxtrain.make_optimizer("adam", 1e-3), jax.random.key(0),
  ...     jnp.zeros((1, 2)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> s = jaxtrain.summary(state, jnp.zeros((32, 2)), jnp.zeros((32,), jnp.int32))
  >>> s.params, [m.path for m in s.modules], s.forward_flops > 2 * 32 * (2 * 16 + 16 * 2)
  (82, ['Dense_0', 'Dense_1'], True)
  """
  def spec(x, n):
    x = jnp.asarray(x) if not hasattr(x, "shape") else x
    return jax.ShapeDtypeStruct((n,) + tuple(x.shape[1:]), x.dtype)

  leading = jax.tree.leaves(example_inputs)[0].shape[0]
  batch = leading if batch_size is None else batch_size
  if batch < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch}")
  stats = {path: sum(int(np.prod(jnp.shape(v))) for v in leaves.values())
           for path, leaves in _leaves_by_module(state.batch_stats).items()}
  modules = tuple(
      ModuleSummary(path, {k: tuple(jnp.shape(v)) for k, v in leaves.items()},
                    sum(int(np.prod(jnp.shape(v))) for v in leaves.values()),
                    sum(_nbytes(v) for v in leaves.values()), stats.get(path, 0))
      for path, leaves in _leaves_by_module(state.params).items())
  inputs = jax.tree.map(lambda x: spec(x, batch), example_inputs)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), state)

  def forward(state, inputs):
    model, variables = state.model, state.variables
    rngs = model.rngs(None, variables, inputs, train=False)
    return model.apply(variables, inputs, train=False, rngs=rngs)[0]

  step = None
  if example_targets is not None and not isinstance(example_inputs, Mapping):
    step = step_flops(state, {"inputs": example_inputs, "targets": example_targets}, batch)
  return Summary(
      modules=modules, params=sum(m.count for m in modules),
      param_bytes=sum(m.bytes for m in modules), batch_stats=sum(stats.values()),
      optimizer_bytes=sum(_nbytes(x) for x in jax.tree.leaves(state.opt_state)),
      batch_size=batch, forward_flops=lowered_flops(forward, shapes, inputs), step_flops=step)
