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

A program takes three named pytrees: the :class:`Carry` it updates (donated),
the :class:`Data` it reads and the :class:`Span` of steps to run, and returns
the new carry and the call's :class:`Outputs`.

The program is written per device with an optional ``axis_name``: under
``shard_map`` every device draws the same permutation, takes its slice of each
global batch and the step averages gradients across devices, so a run on four
devices equals the run on one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.core import plateau as plateau_lib
from jaxtrain.core.keys import key_for
from jaxtrain.core.metrics import is_sum, means
from jaxtrain.core.optim import current_learning_rate
from jaxtrain.core.step import accumulate_gradients, eval_step
from jaxtrain.data.arrays import gather_rows
from jaxtrain.data.batching import epoch_indices
from jaxtrain.engine import best as best_lib
from jaxtrain.engine.calls import (
  Carry,
  Data,
  Outputs,
  Packed,
  Span,
  pack_metrics,
  unpack_metrics,
)
from jaxtrain.engine.evaluate import evaluate_all, maybe_evaluate
from jaxtrain.engine.parallel import local_rows
from jaxtrain.engine.spec import ProgramSpec
from jaxtrain.nn.conv import flax_convs
from jaxtrain.nn.cpu_random import fast_random_bits

Arrays = Mapping[str, jax.Array]
# augment(key, one_example_inputs) -> augmented inputs of the same shape.
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _train_step(spec: ProgramSpec, augment, axis_name, carry: Carry, data: Data, run_key,
                batch) -> tuple[Carry, dict]:
  """One step on ``batch``, this device's rows of the global batch."""
  state, halted = carry.state, carry.halted
  if augment is not None:
    # One key per global row position, so the augmentation of a row does not
    # depend on how the batch is split across devices.
    keys = jax.random.split(key_for(run_key, "augment", state.step), spec.batch_size)
    batch["inputs"] = jax.vmap(augment)(local_rows(keys, axis_name), batch["inputs"])
  grads, batch_stats, metrics = accumulate_gradients(
      state, batch, key_for(run_key, "dropout", state.step), spec.accumulate,
      axis_name=axis_name)
  finite = jnp.isfinite(metrics["loss"])
  if state.loss_scale is None:  # with one, apply_gradients skips overflowed updates
    finite = finite & jnp.isfinite(metrics["grad_norm"])
  # A non-finite update is never applied; with "stop" nothing after it is
  # either. lax.cond, not a select over the state: XLA copies every buffer the
  # select keeps alive (the params and optimizer state, each step), which cost
  # the 784-1024-1024-10 MLP ~10% of its speed; on tiny models the two tie.
  state = jax.lax.cond(
      finite & ~halted,
      lambda s: s.apply_gradients(grads, batch_stats=batch_stats), lambda s: s, state)
  if spec.nonfinite == "stop":
    halted = halted | ~finite
  # NaN for an optimizer without an injected learning rate (plain optax).
  learning_rate = current_learning_rate(state.opt_state, default=float("nan"))
  if state.plateau is not None:
    learning_rate = learning_rate * state.plateau.scale
  metrics = {**metrics, "finite": finite, "learning_rate": learning_rate}
  if spec.eval_every:
    metrics.update(maybe_evaluate(spec, state, data.step_evals, axis_name))
  return carry._replace(state=state, halted=halted), metrics


def epoch_end(spec: ProgramSpec, carry: Carry, sums, ended) -> Carry:
  """What an epoch's evaluation ``sums`` update once it ``ended`` (traced
  bool): the best epoch's record, and the ReduceLROnPlateau state."""
  if spec.best is not None and carry.best is not None:
    carry = carry._replace(best=best_lib.update(spec.best, carry.best, carry.state, sums,
                                                ended))
  if spec.plateau is not None and carry.state.plateau is not None:
    rule, split, metric = spec.plateau
    state = carry.state
    stepped = plateau_lib.step(
        rule, state.plateau, means(sums[split])[metric],
        current_learning_rate(state.opt_state, default=float("nan")))
    plateau = jax.tree.map(lambda new, old: jnp.where(ended, new, old), stepped, state.plateau)
    carry = carry._replace(state=state.replace(plateau=plateau))
  return carry


def _epoch_batches(spec: ProgramSpec, run_key, epoch):
  return epoch_indices(
      key_for(run_key, "shuffle", epoch) if spec.shuffle else None, spec.num_train,
      spec.batch_size, spec.drop_remainder)


def _resident_batches(spec: ProgramSpec, axis_name, data: Data, span: Span):
  """``epoch -> (i -> batch i)``: rows gathered from the resident training
  arrays in the epoch's order."""
  def of_epoch(epoch):
    indices, masks = _epoch_batches(spec, span.run_key, epoch)
    # Indices come from epoch_indices and are in bounds: no out-of-bounds fill.
    return lambda i: gather_rows(
        data.train, local_rows(indices[i], axis_name), local_rows(masks[i], axis_name),
        take=lambda v, idx: v.at[idx].get(mode="promise_in_bounds"))
  return of_epoch


def _streamed_batches(spec: ProgramSpec, axis_name, data: Data, span: Span):
  """``epoch -> (i -> batch i)``: the rows the host read for the span, one
  ``[steps, rows, ...]`` block per array (already this device's rows)."""
  spe = spec.steps_per_epoch
  return lambda epoch: lambda i: jax.tree.map(
      lambda v: v[epoch * spe + i - span.first], data.train)


def _train_span(spec: ProgramSpec, augment: Augment | None, axis_name, batches,
                carry: Carry, data: Data, span: Span) -> tuple[Carry, Outputs]:
  """Runs global steps ``span.first .. span.first + span.num`` across epochs,
  on the batches ``batches(spec, axis_name, data, span)`` gives."""
  spe = spec.steps_per_epoch
  first, run_key = span.first, span.run_key
  last = first + span.num
  first_epoch = first // spe
  step = functools.partial(_train_step, spec, augment, axis_name)
  batch_of = batches(spec, axis_name, data, span)
  zero = jnp.zeros((), jnp.int32)
  shapes = jax.eval_shape(lambda c, s: step(c, data, run_key, batch_of(zero)(zero))[1],
                          carry, span)
  steps = jnp.zeros((spec.span, len(shapes)), jnp.float32)
  sums_shapes = jax.eval_shape(functools.partial(evaluate_all, spec, axis_name),
                               carry.state, data.epoch_evals)
  sums = jax.tree.map(lambda v: jnp.zeros((spec.epoch_slots,) + v.shape, v.dtype), sums_shapes)

  def epoch_body(epoch, loop):
    batch = batch_of(epoch)
    base = epoch * spe - first  # buffer entry of the epoch's step 0

    def step_body(i, loop):
      carry, steps = loop
      carry, metrics = step(carry, data, run_key, batch(i))
      return carry, steps.at[base + i].set(pack_metrics(metrics, shapes))

    carry, steps, sums = loop
    end = jnp.minimum(last - epoch * spe, spe)
    carry, steps = jax.lax.fori_loop(
        jnp.maximum(first - epoch * spe, 0), end, step_body, (carry, steps))
    if data.epoch_evals:
      epoch_sums = jax.lax.cond(
          end == spe, lambda s: evaluate_all(spec, axis_name, s, data.epoch_evals),
          lambda s: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), sums_shapes),
          carry.state)
      sums = jax.tree.map(lambda b, v: b.at[epoch - first_epoch].set(v), sums, epoch_sums)
      carry = epoch_end(spec, carry, epoch_sums, end == spe)
    return carry, steps, sums

  carry, steps, sums = jax.lax.fori_loop(
      first_epoch, (last + spe - 1) // spe, epoch_body, (carry, steps, sums))
  return carry, Outputs(unpack_metrics(steps, shapes), sums)


def _train_one(spec: ProgramSpec, augment: Augment | None, axis_name, batches,
               carry: Carry, data: Data, span: Span) -> tuple[Carry, Outputs]:
  """One step, straight-line (no loop): XLA:CPU runs convolutions inside loops
  far slower (jax#12868). Metrics come back as one :class:`Packed` ``[1, k]``
  row, their names and dtypes in its tree structure (so each trace of the
  program returns its own); the caller evaluates at epoch ends
  (``Outputs.epochs`` is None)."""
  epoch, index = jnp.divmod(span.first, spec.steps_per_epoch)
  batch = batches(spec, axis_name, data, span)(epoch)(index)
  carry, metrics = _train_step(spec, augment, axis_name, carry, data, span.run_key, batch)
  names = tuple((k, np.dtype(jnp.result_type(v))) for k, v in metrics.items())
  return carry, Outputs(Packed(pack_metrics(metrics, metrics)[None], names), None)


def _add_batch_sums(axis_name, state, totals, batch):
  """``totals`` plus the sums of one evaluation batch (this device's rows):
  a streamed set is evaluated batch by batch in the order of :func:`evaluate`."""
  sums = {k: v for k, v in eval_step(state, batch, axis_name=axis_name).items() if is_sum(k)}
  return jax.tree.map(jnp.add, totals, sums)


_TRAIN_KINDS = {"train": (_train_span, _resident_batches),
                "step": (_train_one, _resident_batches),
                "stream": (_train_span, _streamed_batches),
                "stream_step": (_train_one, _streamed_batches)}


def _program(kind, spec, augment, axis_name):
  if kind in _TRAIN_KINDS:
    body, batches = _TRAIN_KINDS[kind]
    return functools.partial(body, spec, augment, axis_name, batches)
  if kind == "eval_batch":
    return functools.partial(_add_batch_sums, axis_name)
  return functools.partial(evaluate_all, spec, axis_name)


def _in_specs(kind, axis_name):
  """shard_map's in_specs: everything replicated, except streamed rows, which
  arrive split over the devices (each holds its own rows only)."""
  if kind in ("stream", "stream_step"):
    return (P(), Data(P(None, axis_name), P(), P()), P())
  if kind == "eval_batch":
    return (P(), P(), P(axis_name))
  return (P(),) * (3 if kind in _TRAIN_KINDS else 2)


def _traced_with_convs(fn, impl: str):
  """``fn`` traced with plain ``nn.Conv`` layers computed as ``impl`` says:
  the user's model is unchanged, only the primitive its convolutions call."""
  @functools.wraps(fn)
  def traced(*args):
    with flax_convs(impl):
      return fn(*args)
  return traced


class _Program:
  """A jitted program whose random draws (dropout masks) lower as
  :func:`jaxtrain.nn.cpu_random.fast_random_bits` draws them: once, in one pass
  on CPU, the same bits. jit lowers at the first call, so every call enters it."""

  def __init__(self, jitted):
    self.jitted = jitted

  def __call__(self, *args):
    with fast_random_bits():
      return self.jitted(*args)

  def lower(self, *args):
    with fast_random_bits():
      return self.jitted.lower(*args)


@functools.lru_cache(maxsize=128)
def _compiled(kind, spec, augment, mesh, donate, members, member_data):
  """One jitted program per configuration, shared by every run that needs it.

  jit caches compiled code per function object; building the functions here
  once means a second ``fit`` with the same setup (and the same model and
  optimizer objects) starts compiled.
  """
  axis_name = mesh.axis_names[0] if mesh is not None else None
  data_axis = 0 if member_data else None
  if kind == "epoch_end":
    fn = functools.partial(epoch_end, spec)
    fn = jax.vmap(fn, in_axes=(0, 0, None)) if members else fn
    return _Program(jax.jit(fn, donate_argnums=(0,) if donate else ()))
  fn = _traced_with_convs(_program(kind, spec, augment, axis_name), spec.conv_impl)
  if kind in _TRAIN_KINDS:
    in_axes, donated = (0, data_axis, Span(0, None, None)), (0,) if donate else ()
  elif kind == "eval_batch":
    in_axes, donated = (None, 0, None), (1,)
  else:
    in_axes, donated = (0, data_axis), ()
  if members:
    fn = jax.vmap(fn, in_axes=in_axes)
  if mesh is not None:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=_in_specs(kind, axis_name), out_specs=P())
  return _Program(jax.jit(fn, donate_argnums=donated))


class Programs:
  """The jitted programs of one run; built once, so nothing recompiles.

  ``train(carry, data, run_key, first, num_steps)`` returns ``(carry, outputs)``
  (see :class:`Outputs`); ``evaluate(state, eval_arrays)`` returns ``{name:
  sums}``. With a ``mesh`` both run as ``shard_map`` over its single axis: the
  state and data are replicated, each device takes its slice of every batch.

  With ``members=True`` the programs are vmapped over a leading axis of the
  carry and the run key (many models, e.g. seeds, in one program); the data
  are shared, or per member with ``member_data=True``.
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

  def epoch_end(self, carry: Carry, sums) -> Carry:
    """The carry after an epoch end evaluated outside the programs (a
    straight-line or host-fed step): see :func:`epoch_end`."""
    if self.spec.best is None and self.spec.plateau is None:
      return carry
    return _compiled("epoch_end", *self._key)(carry, sums, True)

  def train(self, carry: Carry, data: Data, run_key, first: int, num_steps: int, *,
            straight: bool = False, streamed: bool = False) -> tuple[Carry, Outputs]:
    """Global steps ``first .. first + num_steps``, evaluating at epoch ends.

    ``straight`` runs a single step without a loop (``num_steps`` must be 1)
    and leaves evaluation to the caller (``Outputs.epochs`` is None).
    ``streamed``: ``data.train`` holds the span's batches as the host read
    them, ``[steps, batch rows, ...]`` per array (split over the devices on a
    mesh), instead of the whole training set.
    """
    if not 1 <= num_steps <= self.spec.span:
      raise ValueError(f"num_steps must be in 1..{self.spec.span}, got {num_steps}")
    if straight and num_steps != 1:
      raise ValueError(f"a straight-line call runs 1 step, got num_steps={num_steps}")
    kind = ("stream" if streamed else "train") + ("_step" if straight else "")
    kind = kind.replace("train_step", "step")
    fn = _compiled(kind, *self._key)
    return fn(carry, data, Span(run_key, np.int32(first), np.int32(num_steps)))

  def add_batch_sums(self, state, totals, batch):
    """``totals`` (donated; zeros at a set's first batch, as in
    :func:`jaxtrain.engine.evaluate.evaluate`) plus one streamed evaluation
    batch's sums, the batch split over the devices."""
    return _compiled("eval_batch", *self._key)(state, totals, batch)

  def place(self, tree, *, copy: bool = False):
    """Puts a tree on the device(s) the programs run on (replicated on a mesh).

    ``copy=True`` gives fresh buffers even for arrays already there: the train
    program donates the carry, and the caller's arrays must survive it.
    """
    target = None if self.mesh is None else NamedSharding(self.mesh, P())
    if target is not None and jax.process_count() > 1:
      # Every process holds the same values: each builds its own devices'
      # copies (device_put would first compare the values across processes,
      # gathering them, and NaN never equals itself).
      def build(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])
      return jax.tree.map(build, tree)
    if copy and target is not None:
      # Replicating to a mesh, device_put reuses the buffer already on one of
      # its devices even with may_alias=False (jax 0.10): the donated carry
      # would delete the caller's arrays. A copy of our own goes instead.
      tree = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(tree, target, may_alias=False if copy else None)
