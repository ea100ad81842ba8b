"""How training data reach the compiled programs: resident on the device, or
streamed from the host, behind one :class:`Feed` interface.

:class:`DeviceFeed` keeps the arrays on the device and runs many steps, across
epochs and with their evaluations, per call (the fast path).
:class:`jaxtrain.engine.stream.StreamFeed` is for data that do not fit: each
step's rows are read on the host in the same epoch order
(:func:`jaxtrain.data.epoch_indices` from the same key) while the device trains,
and the same compiled step body trains on them, so both feeds give the same
run. :func:`fetch` brings a call's results to the host in one sync.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from jaxtrain.data.indexed import Source
from jaxtrain.engine.calls import Carry, Data, Packed
from jaxtrain.engine.programs import Programs
from jaxtrain.engine.spec import ProgramSpec


class Chunk(NamedTuple):
  """What one call trained: global steps ``first .. first + num``.

  ``steps`` holds per-step metrics (entry ``j`` is step ``first + j``; longer
  arrays are padded); ``epochs`` holds ``{name: sums}`` with a leading slot axis,
  slot ``k`` being epoch ``first // steps_per_epoch + k`` where that epoch ended
  in the chunk, or None when no epoch ended or nothing is evaluated.
  """

  first: int
  num: int
  steps: dict
  epochs: dict | None


def _stack_sums(sums):
  return None if not sums else jax.tree.map(lambda v: v[None], sums)


class Feed:
  """What ``fit`` asks of a feed; :class:`DeviceFeed` and
  :class:`~jaxtrain.engine.stream.StreamFeed` implement it.

  Attributes:
    spec: the run's program description.
    programs: the compiled programs the feed calls.
  """

  def __init__(self, spec: ProgramSpec, programs: Programs):
    self.spec, self.programs = spec, programs

  @property
  def max_steps(self) -> int:
    """The most steps one :meth:`train` call takes."""
    return self.spec.span

  def place(self, tree, *, copy: bool = False):
    """Puts ``tree`` where the programs run (see :meth:`Programs.place`)."""
    return self.programs.place(tree, copy=copy)

  def train(self, carry: Carry, run_key, first: int, num_steps: int
            ) -> tuple[Carry, list[Chunk]]:
    """Trains global steps ``first .. first + num_steps``, evaluating the epoch
    sets at every epoch end."""
    raise NotImplementedError

  def evaluate(self, state, sets: Mapping[str, Mapping] | None = None) -> dict:
    """``{name: sums}`` of every epoch evaluation set, or of ``sets`` (host arrays)."""
    raise NotImplementedError

  def _epoch_end(self, carry: Carry, step: int) -> tuple[Carry, dict | None]:
    """After one-step call ``step``: at an epoch end, the epoch sets' sums
    (stacked as one slot) and the carry updated from them (best epoch,
    ReduceLROnPlateau)."""
    if (step + 1) % self.spec.steps_per_epoch:
      return carry, None
    sums = self.evaluate(carry.state)
    if sums:
      carry = self.programs.epoch_end(carry, sums)
    return carry, _stack_sums(sums)


class DeviceFeed(Feed):
  """Training and evaluation arrays placed once on the device(s).

  ``straight=True`` runs one straight-line step per call (``execution="step"``).
  """

  def __init__(self, spec: ProgramSpec, train, evals: Mapping[str, Mapping], *,
               augment=None, mesh=None, step_evals: bool = False, straight: bool = False):
    super().__init__(spec, Programs(spec, augment=augment, mesh=mesh))
    self.straight = straight
    train_arrays = self.place(train)
    self.evals = {name: (train_arrays if arrays is train else self.place(arrays))
                  for name, arrays in evals.items()}
    self.data = Data(train_arrays, self.evals if step_evals else {}, self.evals)

  def train(self, carry, run_key, first, num_steps):
    if not self.straight:
      carry, out = self.programs.train(carry, self.data, run_key, first, num_steps)
      return carry, [Chunk(first, num_steps, out.steps, out.epochs if self.evals else None)]
    chunks, data = [], self.data._replace(epoch_evals={})
    for step in range(first, first + num_steps):
      carry, out = self.programs.train(carry, data, run_key, step, 1, straight=True)
      carry, sums = self._epoch_end(carry, step)
      chunks.append(Chunk(step, 1, out.steps, sums))
    return carry, chunks

  def evaluate(self, state, sets=None):
    evals = self.evals if sets is None else {
        k: self.place(v.to_arrays() if isinstance(v, Source) else v) for k, v in sets.items()}
    return self.programs.evaluate(state, evals)


def fetch(chunks: Sequence[Chunk], steps_per_epoch: int, *, members: bool = False):
  """A call's results on the host, in one sync.

  Returns:
    ``(steps, epoch_sums)``: ``{metric: [num steps]}`` for the chunks' steps in
    order, and ``{epoch (0-based): {set: sums}}`` for every epoch that ended.
    With ``members`` (vmapped programs) every array keeps its leading member
    axis: ``[members, num steps]`` and sums of shape ``[members]``.
  """
  lead = (slice(None),) if members else ()
  fetched = [(f.unpack() if isinstance(f, Packed) else f, sums)
             for f, sums in jax.device_get([(c.steps, c.epochs) for c in chunks])]
  steps = {k: np.concatenate([f[0][k][lead + (slice(0, c.num),)]
                              for f, c in zip(fetched, chunks)], axis=len(lead))
           for k in fetched[0][0]}
  epoch_sums = {}
  for (_, sums), chunk in zip(fetched, chunks):
    start = chunk.first // steps_per_epoch
    for epoch in range(start, (chunk.first + chunk.num) // steps_per_epoch):
      if sums is not None:
        epoch_sums[epoch] = jax.tree.map(lambda v, k=epoch - start: v[lead + (k,)], sums)
  return steps, epoch_sums


def fits_on_device(*sets) -> bool:
  """Whether these sets (dicts of arrays, :class:`~jaxtrain.data.Source` objects or
  None) should live on the device: under half its memory."""
  size = sum(len(s) * s.row_bytes() if isinstance(s, Source)
             else sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(s)) for s in sets)
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit", 8 << 30)  # CPU: the host's memory; be modest
  return size <= limit // 2
