"""Streaming: training rows read from a :class:`~jaxtrain.data.Source` on the host
while the device trains, for data that do not fit on the device.

Each step's rows are those of the device path: the epoch order is
:func:`jaxtrain.data.epoch_indices` of the same epoch key, so both paths train
on the same batches and give the same run, bit for bit. Every process reads only
the rows of its own devices (their slice of each global batch) and builds its
part of the global batch, which is split over the mesh; nothing but the global
step says where a run is, so a resume (even with another process count on the
same global batch) needs no iterator state.

Reading runs ahead in Grain's threads (``grain.MapDataset`` mapped over blocks of
steps, prefetched through a bounded buffer of blocks), so the host reads block
``k + 1`` while the device trains on block ``k``. One call trains up to
``spec.span`` steps from one ``[steps, rows, ...]`` block of host rows with the
same step body as the device path (the ``"stream"`` program).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.core.keys import key_for
from jaxtrain.core.metrics import is_sum
from jaxtrain.core.step import eval_step
from jaxtrain.data.batching import epoch_indices
from jaxtrain.data.indexed import Source, head
from jaxtrain.engine.calls import Data
from jaxtrain.engine.feeds import Chunk, Feed
from jaxtrain.engine.programs import Programs
from jaxtrain.engine.spec import ProgramSpec

#: Bytes of host rows one call trains on at most (sets the steps per call).
CALL_BYTES = 64 << 20
#: Bytes of one block read ahead; ``PREFETCH_BLOCKS`` of them are buffered.
BLOCK_BYTES = 8 << 20
PREFETCH_BLOCKS = 4


def _threads() -> int:
  return max(1, min(4, os.cpu_count() or 1))


class _Layout:
  """Which rows of a global batch this process reads: its devices' slices."""

  def __init__(self, mesh, batch_size: int):
    devices = [None] if mesh is None else list(mesh.devices.flat)
    self.mesh, self.per = mesh, batch_size // len(devices)
    here = jax.process_index()
    self.slots = [j for j, d in enumerate(devices) if d is None or d.process_index == here]
    self.positions = np.concatenate(
        [np.arange(j * self.per, (j + 1) * self.per) for j in self.slots])

  def place(self, host: np.ndarray, axis: int, per: int | None = None):
    """The global array whose ``axis`` (the batch, ``per`` rows per device)
    is split over the mesh, from this process's rows of it (``host``)."""
    if self.mesh is None:
      return jax.device_put(host)
    per = per or self.per
    spec = P(*([None] * axis), self.mesh.axis_names[0])
    shape = list(host.shape)
    shape[axis] = per * self.mesh.devices.size
    where = {j: k for k, j in enumerate(self.slots)}

    def rows(index):
      k = where[(index[axis].start or 0) // per]
      return host[(slice(None),) * axis + (slice(k * per, (k + 1) * per),)]
    return jax.make_array_from_callback(tuple(shape), NamedSharding(self.mesh, spec), rows)


def _prefetched(read, start: int, stop: int):
  """``read(i)`` for ``i`` in ``start .. stop``, in order, computed ahead in
  Grain's threads through a bounded buffer."""
  import grain  # imported only when streaming

  dataset = grain.MapDataset.range(start, stop).map(read)
  options = grain.ReadOptions(num_threads=_threads(), prefetch_buffer_size=PREFETCH_BLOCKS)
  return iter(dataset.to_iter_dataset(read_options=options))


class _Orders:
  """This process's columns of each epoch's batch indices and masks, computed
  once per epoch for one reader (its threads ask for an epoch many times; a
  reader abandoned on a jump keeps its own cache, so it never fills the next's)."""

  def __init__(self, run_key, spec: ProgramSpec, positions: np.ndarray):
    self.run_key, self.spec, self.positions = run_key, spec, positions
    self.lock, self.epochs = threading.Lock(), {}

  def get(self, epoch: int):
    with self.lock:
      if epoch not in self.epochs:
        indices, masks = jax.device_get(epoch_indices(
            key_for(self.run_key, "shuffle", epoch), self.spec.num_train,
            self.spec.batch_size, self.spec.drop_remainder))
        for old in [e for e in self.epochs if e < epoch - 1]:
          del self.epochs[old]
        self.epochs[epoch] = indices[:, self.positions], masks[:, self.positions]
      return self.epochs[epoch]


class StreamFeed(Feed):
  """Training rows streamed from a source; evaluation sets resident when they
  fit (evaluated inside the call, as on the device path) or streamed batch by
  batch at epoch ends.

  Args:
    spec: the run's program description.
    train: the training :class:`~jaxtrain.data.Source`.
    evals: ``{name: placed arrays or Source}`` evaluated at every epoch end.
    total_steps: the run's last step (blocks are read ahead up to it).
    straight: one straight-line step per call (``execution="step"``).
  """

  def __init__(self, spec: ProgramSpec, train: Source, evals: Mapping, *, total_steps: int,
               augment=None, mesh=None, straight: bool = False):
    step_bytes = max(1, train.row_bytes() * spec.batch_size)
    span = 1 if straight else max(1, min(spec.span, CALL_BYTES // step_bytes))
    spec = dataclasses.replace(spec, max_steps=span)
    super().__init__(spec, Programs(spec, augment=augment, mesh=mesh))
    self.source, self.straight, self.total = train, straight, total_steps
    self.layout = _Layout(mesh, spec.batch_size)
    self.eval_layout = _Layout(mesh, spec.eval_batch_size)
    self.block = max(1, min(span, BLOCK_BYTES // step_bytes))
    self.resident = {k: self.place(v) for k, v in evals.items() if not isinstance(v, Source)}
    self.streamed = {k: v for k, v in evals.items() if isinstance(v, Source)}
    self.evals = {**self.resident, **self.streamed}
    self.in_call = not straight and not self.streamed
    self._key, self._at, self._blocks, self._left = None, None, None, None
    self._sum_shapes = None

  # -- reading -----------------------------------------------------------------

  def _read_block(self, orders: "_Orders", block: int):
    """This process's rows of the steps of ``block``: ``[steps, rows, ...]``."""
    spe = self.spec.steps_per_epoch
    steps = range(block * self.block, min((block + 1) * self.block, self.total))
    index, mask = [], []
    for step in steps:
      epoch, i = divmod(step, spe)
      indices, masks = orders.get(epoch)
      index.append(indices[i])
      mask.append(masks[i])
    index, mask = np.stack(index), np.stack(mask)
    rows = self.source.read(index.ravel())
    out = {k: v.reshape(index.shape + v.shape[1:]) for k, v in rows.items() if k != "mask"}
    if "mask" in rows:
      mask = mask * rows["mask"].reshape(index.shape).astype(np.float32)
    return {**out, "mask": mask}

  def _take(self, run_key, first: int, num: int) -> dict:
    """Steps ``first .. first + num`` as ``[span, rows, ...]`` host arrays
    (entries past ``num`` are unused)."""
    if self._key is not run_key or self._at != first:
      if first >= self.total:
        raise ValueError(f"step {first} is past the run's last step {self.total}")
      self._key = run_key
      orders = _Orders(run_key, self.spec, self.layout.positions)
      self._blocks = _prefetched(functools.partial(self._read_block, orders),
                                 first // self.block, -(-self.total // self.block))
      self._left = (next(self._blocks), first % self.block)
    out, done = None, 0
    while done < num:
      if self._left is None:
        self._left = (next(self._blocks), 0)
      block, offset = self._left
      take = min(num - done, len(block["mask"]) - offset)
      if out is None:
        out = {k: np.empty((self.spec.span,) + v.shape[1:], v.dtype) for k, v in block.items()}
      for k, v in block.items():
        out[k][done:done + take] = v[offset:offset + take]
      done += take
      self._left = (block, offset + take) if offset + take < len(block["mask"]) else None
    self._at = first + num
    return out

  # -- training ----------------------------------------------------------------

  def train(self, carry, run_key, first, num_steps):
    chunks, step, end = [], first, first + num_steps
    spe = self.spec.steps_per_epoch
    while step < end:
      stop = end if self.in_call else min(end, (step // spe + 1) * spe, step + self.spec.span)
      rows = self._take(run_key, step, stop - step)
      data = Data({k: self.layout.place(v, 1) for k, v in rows.items()}, {},
                  self.resident if self.in_call else {})
      carry, out = self.programs.train(carry, data, run_key, step, stop - step,
                                       straight=self.straight, streamed=True)
      sums = out.epochs if self.in_call and self.resident else None
      if not self.in_call:
        carry, sums = self._epoch_end(carry, stop - 1)
      chunks.append(Chunk(step, stop - step, out.steps, sums))
      step = stop
    return carry, chunks

  # -- evaluation --------------------------------------------------------------

  def evaluate(self, state, sets=None):
    if sets is None:
      resident, streamed, names = self.resident, self.streamed, list(self.evals)
    else:
      resident = {k: self.place(v) for k, v in sets.items() if not isinstance(v, Source)}
      streamed = {k: v for k, v in sets.items() if isinstance(v, Source)}
      names = list(sets)
    totals = dict(self.programs.evaluate(state, resident)) if resident else {}
    for name, source in streamed.items():
      totals[name] = self._stream_sums(state, source)
      if state.ema is not None:
        totals[f"{name}_ema"] = self._stream_sums(state.with_ema_params(), source)
    if state.ema is not None:
      names = [n for name in names for n in (name, f"{name}_ema")]
    return {k: totals[k] for k in names}

  def _read_eval(self, source: Source, batch: int):
    """This process's rows of evaluation batch ``batch`` (the last one padded
    with zero rows only as far as the devices need, as on the device path)."""
    n, size = len(source), self.spec.eval_batch_size
    start = batch * size
    rows_in = min(size, n - start)
    shards = 1 if self.layout.mesh is None else self.layout.mesh.devices.size
    width = rows_in + (-rows_in % shards)
    per = width // shards
    positions = np.concatenate([np.arange(j * per, (j + 1) * per)
                                for j in self.eval_layout.slots])
    real = positions < rows_in
    rows = source.read(start + positions[real])
    out = {}
    for k, v in rows.items():
      full = np.zeros((len(positions),) + v.shape[1:], v.dtype)
      full[real] = v
      out[k] = full
    mask = real.astype(np.float32)
    out["mask"] = mask * out["mask"].astype(np.float32) if "mask" in rows else mask
    return out, per

  def _stream_sums(self, state, source: Source):
    """The sums of ``eval_step`` over a streamed set, batch by batch."""
    if self._sum_shapes is None:
      example = {**head(source, 1), "mask": np.ones((1,), np.float32)}
      sums = jax.eval_shape(eval_step, state, example)
      self._sum_shapes = {k: v for k, v in sums.items() if is_sum(k)}
    totals = self.place({k: jnp.zeros(v.shape, v.dtype) for k, v in self._sum_shapes.items()})
    count = -(-len(source) // self.spec.eval_batch_size)
    for rows, per in _prefetched(functools.partial(self._read_eval, source), 0, count):
      batch = {k: self.eval_layout.place(v, 0, per) for k, v in rows.items()}
      totals = self.programs.add_batch_sums(state, totals, batch)
    return totals

