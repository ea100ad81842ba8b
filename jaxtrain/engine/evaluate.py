"""Whole-set evaluation inside compiled programs: exact sums over a set.

A set is cut in order into full batches (a reshape, no gather) and one smaller
last batch, padded only as far as the devices need; :func:`jaxtrain.eval_step`
gives each batch's sums and they are added. Written per device: with an
``axis_name`` each device takes its slice of every batch and the sums are
reduced over the devices.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxtrain.core.metrics import is_sum, means
from jaxtrain.core.state import TrainState
from jaxtrain.core.step import eval_step
from jaxtrain.engine.parallel import local_rows
from jaxtrain.engine.spec import ProgramSpec

Arrays = Mapping[str, jax.Array]


def evaluate(state: TrainState, arrays: Arrays, batch_size: int, axis_name=None):
  """Exact sums (loss_sum, count[, correct]) of ``eval_step`` over a whole set."""
  n = jax.tree.leaves(arrays)[0].shape[0]
  shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  full, rest = divmod(n, batch_size)

  def sums_of(batch):
    batch = jax.tree.map(lambda v: local_rows(v, axis_name), batch)
    sums = eval_step(state, batch, axis_name=axis_name)
    return {k: v for k, v in sums.items() if is_sum(k)}

  with_mask = {**arrays, "mask": arrays.get("mask", jnp.ones((n,), jnp.float32))}
  totals = None
  if full:
    batches = jax.tree.map(
        lambda v: v[: full * batch_size].reshape((full, batch_size) + v.shape[1:]), with_mask)
    shapes = jax.eval_shape(sums_of, jax.tree.map(lambda v: v[0], batches))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals = jax.lax.scan(lambda t, b: (jax.tree.map(jnp.add, t, sums_of(b)), None),
                          zeros, batches)[0]
  if rest:
    pad = -rest % shards
    last = jax.tree.map(
        lambda v: jnp.pad(v[full * batch_size:], [(0, pad)] + [(0, 0)] * (v.ndim - 1)),
        with_mask)
    sums = sums_of(last)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return totals


def evaluate_all(spec: ProgramSpec, axis_name, state, evals: Mapping[str, Arrays]):
  """``{name: sums}`` of every set in ``evals``, and ``{name}_ema`` of the
  parameters' moving average when the state keeps one."""
  out = {}
  for name, arrays in evals.items():
    out[name] = evaluate(state, arrays, spec.eval_batch_size, axis_name)
    if state.ema is not None:
      out[f"{name}_ema"] = evaluate(state.with_ema_params(), arrays, spec.eval_batch_size,
                                    axis_name)
  return out


def maybe_evaluate(spec: ProgramSpec, state, evals: Mapping[str, Arrays], axis_name):
  """``{"<set>_<metric>": mean}`` every ``spec.eval_every`` steps; NaN on the others."""
  def run(state):
    out = {}
    for name, sums in evaluate_all(spec, axis_name, state, evals).items():
      for metric, value in means(sums).items():
        out[f"{name}_{metric}"] = value.astype(jnp.float32)
    return out

  shapes = jax.eval_shape(run, state)

  def skip(state):
    return {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in shapes.items()}

  return jax.lax.cond(state.step % spec.eval_every == 0, run, skip, state)
