"""Compiled training programs: many steps, across epochs, in one call on device.

The training arrays live on the device. One call runs a span of global steps:
for each epoch it touches it draws the epoch's order from the epoch key
(:func:`jaxtrain.data.epoch_indices`), runs :func:`jaxtrain.train_step` over the
batches in a loop, and at every epoch end it reaches evaluates the whole
evaluation sets; per-step metrics and per-epoch sums come back as arrays once per
call. Every key is ``key_for(run_key, use, position)`` and the span's bounds are
traced, so one executable serves every span: how a run is cut into calls (a
whole run in one call, one epoch, or a mid-epoch checkpoint) cannot change a bit
of it, which is what makes a resume exact.

The program is written per device with an optional ``axis_name``: under
``shard_map`` every device draws the same permutation, takes its slice of each
global batch and the step averages gradients across devices, so a run on four
devices equals the run on one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtrain import data
from jaxtrain.keys import key_for
from jaxtrain.optim import current_learning_rate
from jaxtrain.state import TrainState
from jaxtrain.step import compute_gradients, eval_step

Arrays = Mapping[str, jax.Array]
# augment(key, one_example_inputs) -> augmented inputs of the same shape.
Augment = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """Static description of a run's compiled programs (hashable).

  Attributes:
    num_train: rows in the training set.
    batch_size: global batch size.
    eval_batch_size: global batch size of evaluations.
    drop_remainder: drop the last incomplete batch of each epoch.
    nonfinite: ``"stop"`` (freeze the state at the first non-finite loss or
      gradient) or ``"skip"`` (skip that update and go on).
    eval_every: evaluate every N steps inside the epoch (0: only at its end).
    shuffle: draw each epoch's order from the epoch key; ``False`` keeps the
      rows' order (the host feed passes batches already in epoch order).
    max_steps: the most steps one call runs (0: one epoch); sets the size of the
      per-step metric buffers, so it is part of the compiled program.
  """

  num_train: int
  batch_size: int
  eval_batch_size: int
  drop_remainder: bool = False
  nonfinite: str = "stop"
  eval_every: int = 0
  shuffle: bool = True
  max_steps: int = 0

  @property
  def steps_per_epoch(self) -> int:
    return data.num_batches(self.num_train, self.batch_size, self.drop_remainder)

  @property
  def span(self) -> int:
    """Steps per call at most."""
    return self.max_steps or self.steps_per_epoch

  @property
  def epoch_slots(self) -> int:
    """Epoch ends a span of ``span`` steps can reach, wherever it starts."""
    return -(-self.span // self.steps_per_epoch) + 1


def _local(rows: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's contiguous slice of a global batch's leading axis."""
  if axis_name is None:
    return rows
  shards = jax.lax.axis_size(axis_name)
  size = rows.shape[0] // shards
  return jax.lax.dynamic_slice_in_dim(rows, jax.lax.axis_index(axis_name) * size, size)


def _gather(arrays: Arrays, idx: jax.Array, mask: jax.Array, axis_name) -> dict:
  idx, mask = _local(idx, axis_name), _local(mask, axis_name)
  # Indices come from epoch_indices and are in bounds: no out-of-bounds fill.
  take = lambda v: v.at[idx].get(mode="promise_in_bounds")  # noqa: E731
  batch = {k: take(v) for k, v in arrays.items() if k != "mask"}
  if "mask" in arrays:
    mask = mask * take(arrays["mask"])
  return {**batch, "mask": mask}


def evaluate(state: TrainState, arrays: Arrays, batch_size: int, axis_name=None):
  """Exact sums (loss_sum, count[, correct]) of ``eval_step`` over a whole set.

  The set is cut in order into full batches (a reshape, no gather) and one
  smaller last batch, padded only as far as the devices need.
  """
  n = jax.tree.leaves(arrays)[0].shape[0]
  shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  full, rest = divmod(n, batch_size)

  def sums_of(batch):
    batch = jax.tree.map(lambda v: _local(v, axis_name), batch)
    sums = eval_step(state, batch, axis_name=axis_name)
    return {k: sums[k] for k in ("loss_sum", "count", "correct") if k in sums}

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


def means(totals: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Loss and accuracy from evaluation sums."""
  count = totals["count"]
  out = {"loss": totals["loss_sum"] / count}
  if "correct" in totals:
    out["accuracy"] = totals["correct"] / count
  return out


def _train_step(spec: ProgramSpec, augment, axis_name, state: TrainState, halted,
                train: Arrays, evals, run_key, indices, masks, i):
  """Step ``i`` of the epoch whose batches are ``indices``/``masks``."""
  batch = _gather(train, indices[i], masks[i], axis_name)
  if augment is not None:
    # One key per global row position, so the augmentation of a row does not
    # depend on how the batch is split across devices.
    keys = jax.random.split(key_for(run_key, "augment", state.step), spec.batch_size)
    batch["inputs"] = jax.vmap(augment)(_local(keys, axis_name), batch["inputs"])
  grads, batch_stats, metrics = compute_gradients(
      state, batch, key_for(run_key, "dropout", state.step), axis_name=axis_name)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  # A non-finite update is never applied; with "stop" nothing after it is
  # either. lax.cond, not a select over the state: XLA copies every buffer the
  # select keeps alive (the params and optimizer state, each step), which cost
  # the 784-1024-1024-10 MLP ~10% of its speed; on tiny models the two tie.
  state = jax.lax.cond(
      finite & ~halted,
      lambda s: s.apply_gradients(grads, batch_stats=batch_stats), lambda s: s, state)
  if spec.nonfinite == "stop":
    halted = halted | ~finite
  metrics = {**metrics, "finite": finite,
             "learning_rate": current_learning_rate(state.opt_state)}
  if spec.eval_every:
    metrics.update(_maybe_evaluate(spec, state, evals, axis_name))
  return state, halted, metrics


def _epoch_batches(spec: ProgramSpec, run_key, epoch):
  return data.epoch_indices(
      key_for(run_key, "shuffle", epoch) if spec.shuffle else None, spec.num_train,
      spec.batch_size, spec.drop_remainder)


def _pack(metrics: Mapping[str, jax.Array], like: Mapping) -> jax.Array:
  """Scalar metrics as one float32 vector (in ``like``'s order): one buffer
  write per step, not one each."""
  return jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in like])


def _unpack(packed: jax.Array, like: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
  return {k: packed[..., j].astype(v.dtype) for j, (k, v) in enumerate(like.items())}


def _train_span(spec: ProgramSpec, augment: Augment | None, axis_name,
                state: TrainState, halted, train: Arrays, step_evals: Mapping[str, Arrays],
                epoch_evals: Mapping[str, Arrays], run_key, first, num_steps):
  """Runs global steps ``first .. first + num_steps`` (both traced), across epochs.

  Returns ``(state, halted, step_metrics, epoch_sums)``: per-step metrics in
  buffers of ``spec.span`` entries (entry ``j`` is step ``first + j``), and for
  every epoch ending inside the span the evaluation sums of ``epoch_evals`` in
  slot ``epoch - first // steps_per_epoch`` (other slots hold zeros).
  """
  spe = spec.steps_per_epoch
  last = first + num_steps
  first_epoch = first // spe
  step = functools.partial(_train_step, spec, augment, axis_name)
  zero = jnp.zeros((), jnp.int32)
  shapes = jax.eval_shape(
      lambda s, h, k: step(s, h, train, step_evals, run_key, *_epoch_batches(spec, k, zero),
                           zero)[2], state, halted, run_key)
  steps = jnp.zeros((spec.span, len(shapes)), jnp.float32)
  sums_shapes = jax.eval_shape(functools.partial(_evaluate_all, spec, axis_name), state,
                               epoch_evals)
  sums = jax.tree.map(lambda v: jnp.zeros((spec.epoch_slots,) + v.shape, v.dtype), sums_shapes)

  def epoch_body(epoch, carry):
    indices, masks = _epoch_batches(spec, run_key, epoch)
    base = epoch * spe - first  # buffer entry of the epoch's step 0

    def step_body(i, carry):
      state, halted, steps = carry
      state, halted, metrics = step(state, halted, train, step_evals, run_key, indices,
                                    masks, i)
      return state, halted, steps.at[base + i].set(_pack(metrics, shapes))

    state, halted, steps, sums = carry
    end = jnp.minimum(last - epoch * spe, spe)
    state, halted, steps = jax.lax.fori_loop(
        jnp.maximum(first - epoch * spe, 0), end, step_body, (state, halted, steps))
    if epoch_evals:
      epoch_sums = jax.lax.cond(
          end == spe, lambda s: _evaluate_all(spec, axis_name, s, epoch_evals),
          lambda s: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), sums_shapes), state)
      sums = jax.tree.map(lambda b, v: b.at[epoch - first_epoch].set(v), sums, epoch_sums)
    return state, halted, steps, sums

  state, halted, steps, sums = jax.lax.fori_loop(
      first_epoch, (last + spe - 1) // spe, epoch_body, (state, halted, steps, sums))
  return state, halted, _unpack(steps, shapes), sums


def _train_one(spec: ProgramSpec, augment: Augment | None, axis_name,
               state: TrainState, halted, train: Arrays, step_evals: Mapping[str, Arrays],
               epoch_evals, run_key, first, num_steps):
  """One step, straight-line (no loop): XLA:CPU runs convolutions inside loops
  far slower (jax#12868). Metrics come back with a leading axis of length 1; the
  caller evaluates at epoch ends (``epoch_sums`` is None)."""
  del num_steps, epoch_evals  # always 1 step; evaluated by the caller
  epoch, index = jnp.divmod(first, spec.steps_per_epoch)
  indices, masks = _epoch_batches(spec, run_key, epoch)
  state, halted, metrics = _train_step(spec, augment, axis_name, state, halted, train,
                                       step_evals, run_key, indices, masks, index)
  return state, halted, jax.tree.map(lambda m: m[None], metrics), None


def _maybe_evaluate(spec, state, evals, axis_name):
  """Evaluation every ``spec.eval_every`` steps; NaN on the other steps."""
  def run(state):
    out = {}
    for name, arrays in evals.items():
      for metric, value in means(evaluate(state, arrays, spec.eval_batch_size,
                                          axis_name)).items():
        out[f"{name}_{metric}"] = value.astype(jnp.float32)
    return out

  shapes = jax.eval_shape(run, state)

  def skip(state):
    return {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in shapes.items()}

  return jax.lax.cond(state.step % spec.eval_every == 0, run, skip, state)


def _evaluate_all(spec: ProgramSpec, axis_name, state, evals: Mapping[str, Arrays]):
  return {name: evaluate(state, arrays, spec.eval_batch_size, axis_name)
          for name, arrays in evals.items()}


@functools.lru_cache(maxsize=128)
def _compiled(kind, spec, augment, mesh, donate, members, member_data):
  """One jitted program per configuration, shared by every run that needs it.

  jit caches compiled code per function object; building the functions here
  once means a second ``fit`` with the same setup (and the same model and
  optimizer objects) starts compiled.
  """
  axis_name = mesh.axis_names[0] if mesh is not None else None
  data_axis = 0 if member_data else None
  if kind in ("train", "step"):
    fn = functools.partial(_train_span if kind == "train" else _train_one, spec, augment,
                           axis_name)
    n_in, donated = 8, donate
    in_axes = (0, 0, data_axis, data_axis, data_axis, 0, None, None)
  else:
    fn = functools.partial(_evaluate_all, spec, axis_name)
    n_in, in_axes, donated = 2, (0, data_axis), False
  if members:
    fn = jax.vmap(fn, in_axes=in_axes)
  if mesh is not None:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(),) * n_in, out_specs=P())
  return jax.jit(fn, donate_argnums=(0,) if donated else ())


class Programs:
  """The jitted programs of one run; built once, so nothing recompiles.

  ``train(state, halted, train_arrays, step_evals, epoch_evals, run_key, first,
  num_steps)`` returns ``(state, halted, step_metrics, epoch_sums)`` (see
  :func:`_train_span`); ``evaluate(state, eval_arrays)`` returns ``{name: sums}``.
  With a ``mesh`` both run as ``shard_map`` over its single axis: the state and
  data are replicated, each device takes its slice of every batch.

  With ``members=True`` the programs are vmapped over a leading axis of the
  state, the halted flag and the run key (many models, e.g. seeds, in one
  program); the data are shared, or per member with ``member_data=True``.
  """

  def __init__(self, spec: ProgramSpec, *, augment: Augment | None = None,
               mesh: Mesh | None = None, donate: bool = True, members: bool = False,
               member_data: bool = False):
    self.spec, self.mesh = spec, mesh
    self.members, self.member_data = members, member_data
    if mesh is not None:
      shards = mesh.devices.size
      for name, size in (("batch_size", spec.batch_size),
                         ("eval_batch_size", spec.eval_batch_size)):
        if size % shards:
          raise ValueError(f"{name} {size} is not divisible by the {shards} devices")
    self._key = (spec, augment, mesh, donate, members, member_data)
    self.evaluate = _compiled("evaluate", *self._key)

  def train(self, state, halted, train_arrays, step_evals, epoch_evals, run_key,
            first: int, num_steps: int, *, straight: bool = False):
    """Global steps ``first .. first + num_steps``, evaluating at epoch ends.

    Returns ``(state, halted, step_metrics, epoch_sums)``: entry ``j`` of the
    metrics is step ``first + j``; ``epoch_sums`` (``{name: sums}`` with a
    leading slot axis) holds epoch ``first // steps_per_epoch + slot`` where that
    epoch ended in the span. ``straight`` runs a single step without a loop
    (``num_steps`` must be 1) and leaves evaluation to the caller
    (``epoch_sums`` is None).
    """
    if not 1 <= num_steps <= self.spec.span:
      raise ValueError(f"num_steps must be in 1..{self.spec.span}, got {num_steps}")
    if straight and num_steps != 1:
      raise ValueError(f"a straight-line call runs 1 step, got num_steps={num_steps}")
    fn = _compiled("step" if straight else "train", *self._key)
    return fn(state, halted, train_arrays, step_evals, epoch_evals, run_key,
              np.int32(first), np.int32(num_steps))

  def place(self, tree, *, copy: bool = False):
    """Puts a tree on the device(s) the programs run on (replicated on a mesh).

    ``copy=True`` gives fresh buffers even for arrays already there: the train
    program donates the state, and the caller's arrays must survive it.
    """
    target = None if self.mesh is None else NamedSharding(self.mesh, P())
    return jax.device_put(tree, target, may_alias=False if copy else None)
