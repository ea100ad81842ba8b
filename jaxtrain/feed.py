"""How training data reach the compiled programs: resident on the device, or
streamed from the host.

:class:`DeviceFeed` keeps the arrays on the device and runs many steps, across
epochs and with their evaluations, per call (the fast path). :class:`HostFeed` is for data that do not fit: each batch is
gathered on the host in the same epoch order (:func:`jaxtrain.data.epoch_indices`
from the same key) and sent to the device while the previous step runs, and the
same compiled step body trains on it, so both feeds give the same run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import data
from jaxtrain.keys import key_for
from jaxtrain.program import ProgramSpec, Programs


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


class DeviceFeed:
  """Training and evaluation arrays placed once on the device(s)."""

  def __init__(self, spec: ProgramSpec, train, evals: Mapping[str, Mapping], *,
               augment=None, mesh=None, step_evals: bool = False, straight: bool = False):
    self.spec = spec
    self.straight = straight  # one straight-line step per call (execution="step")
    self.programs = Programs(spec, augment=augment, mesh=mesh)
    self.place = self.programs.place
    self.train_arrays = self.place(train)
    self.evals = {name: (self.train_arrays if arrays is train else self.place(arrays))
                  for name, arrays in evals.items()}
    self.step_evals = self.evals if step_evals else {}

  @property
  def max_steps(self) -> int:
    """The most steps one :meth:`train` call takes."""
    return self.spec.span

  def train(self, state, halted, run_key, first: int, num_steps: int):
    """Trains global steps ``first .. first + num_steps``, evaluating the epoch
    sets at every epoch end; returns ``(state, halted, [Chunk, ...])``."""
    if not self.straight:
      state, halted, steps, sums = self.programs.train(
          state, halted, self.train_arrays, self.step_evals, self.evals, run_key, first,
          num_steps)
      return state, halted, [Chunk(first, num_steps, steps, sums if self.evals else None)]
    chunks = []
    for step in range(first, first + num_steps):
      state, halted, steps, _ = self.programs.train(
          state, halted, self.train_arrays, self.step_evals, {}, run_key, step, 1,
          straight=True)
      ends = (step + 1) % self.spec.steps_per_epoch == 0
      chunks.append(Chunk(step, 1, steps, _stack_sums(self.evaluate(state)) if ends else None))
    return state, halted, chunks

  def evaluate(self, state, sets: Mapping[str, Mapping] | None = None):
    """Sums of every epoch evaluation set, or of ``sets`` (host arrays)."""
    evals = self.evals if sets is None else {k: self.place(v) for k, v in sets.items()}
    return self.programs.evaluate(state, evals)


class HostFeed:
  """Batches gathered on the host and prefetched; one step per call."""

  def __init__(self, spec: ProgramSpec, train, evals: Mapping[str, Mapping], *,
               augment=None, mesh=None, step_evals: bool = False, straight: bool = False):
    del straight  # every call is one step on one batch
    if step_evals:
      raise ValueError("eval_every_steps needs the data on the device (data='device')")
    self.spec, self.train_arrays, self.evals = spec, train, dict(evals)
    step_spec = dataclasses.replace(spec, num_train=spec.batch_size, shuffle=False,
                                    drop_remainder=False, eval_every=0, max_steps=0)
    eval_spec = dataclasses.replace(step_spec, batch_size=spec.eval_batch_size,
                                    num_train=spec.eval_batch_size)
    self.programs = Programs(step_spec, augment=augment, mesh=mesh)
    self.eval_programs = Programs(eval_spec, mesh=mesh)
    self.place = self.programs.place
    self._epoch, self._order = None, None

  max_steps = DeviceFeed.max_steps

  def _batch(self, run_key, step: int):
    epoch, index = divmod(step, self.spec.steps_per_epoch)
    if self._epoch != epoch:
      n = len(self.train_arrays["targets"])
      self._order = jax.device_get(data.epoch_indices(
          key_for(run_key, "shuffle", epoch), n, self.spec.batch_size,
          self.spec.drop_remainder))
      self._epoch = epoch
    idx, mask = self._order[0][index], self._order[1][index]
    batch = {k: np.asarray(v)[idx] for k, v in self.train_arrays.items() if k != "mask"}
    if "mask" in self.train_arrays:
      mask = mask * np.asarray(self.train_arrays["mask"], np.float32)[idx]
    return self.place({**batch, "mask": mask})

  def train(self, state, halted, run_key, first: int, num_steps: int):
    chunks = []
    batch = self._batch(run_key, first)
    for step in range(first, first + num_steps):
      # The one-step program sees a one-batch "epoch": step 0 of epoch 0 is this
      # batch, while the state's own step keeps the dropout keys global.
      state, halted, metrics, _ = self.programs.train(state, halted, batch, {}, {},
                                                      run_key, 0, 1, straight=True)
      if step + 1 < first + num_steps:
        # Prepared while the step above runs (dispatch is asynchronous).
        batch = self._batch(run_key, step + 1)
      ends = (step + 1) % self.spec.steps_per_epoch == 0
      chunks.append(Chunk(step, 1, metrics, _stack_sums(self.evaluate(state)) if ends else None))
    return state, halted, chunks

  def evaluate(self, state, sets: Mapping[str, Mapping] | None = None):
    totals = {}
    for name, arrays in (self.evals if sets is None else sets).items():
      for batch in data.batches(arrays, self.spec.eval_batch_size):
        sums = self.eval_programs.evaluate(state, {name: self.place(batch)})[name]
        totals[name] = sums if name not in totals else jax.tree.map(
            jnp.add, totals[name], sums)
    return totals


def fits_on_device(*trees) -> bool:
  """Whether arrays of this size should live on the device (half its memory)."""
  size = sum(np.asarray(leaf).nbytes for tree in trees for leaf in jax.tree.leaves(tree))
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit", 8 << 30)  # CPU: the host's memory; be modest
  return size <= limit // 2
