"""The static description of a run's compiled programs."""

from __future__ import annotations

import dataclasses

from jaxtrain.data.batching import num_batches
from jaxtrain.engine.best import BestRule


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
    accumulate: micro-batches per update: each step's ``batch_size`` rows are
      split into this many slices whose gradients are accumulated.
    best: the rule ranking epochs whose best parameters the carry keeps (see
      :mod:`jaxtrain.engine.best`), or None.
    plateau: ``(rule, split, metric)``: a ReduceLROnPlateau stepped at every
      epoch end with the mean ``metric`` of the evaluated ``split``, or None.
    conv_impl: how the programs trace plain ``flax.linen.Conv`` layers (see
      :func:`jaxtrain.conv.flax_convs`).
  """

  num_train: int
  batch_size: int
  eval_batch_size: int
  drop_remainder: bool = False
  nonfinite: str = "stop"
  eval_every: int = 0
  shuffle: bool = True
  max_steps: int = 0
  accumulate: int = 1
  best: BestRule | None = None
  plateau: tuple | None = None
  conv_impl: str = "auto"

  @property
  def steps_per_epoch(self) -> int:
    return num_batches(self.num_train, self.batch_size, self.drop_remainder)

  @property
  def span(self) -> int:
    """Steps per call at most."""
    return self.max_steps or self.steps_per_epoch

  @property
  def epoch_slots(self) -> int:
    """Epoch ends a span of ``span`` steps can reach, wherever it starts."""
    return -(-self.span // self.steps_per_epoch) + 1
