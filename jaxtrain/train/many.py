"""Many models in one compiled program: seeds (and learning rates) under ``vmap``.

Small models leave a CPU or GPU mostly idle; training 16 seeds as one vmapped
program runs them in the time of a few. Each member is exactly the run
:func:`jaxtrain.fit` would do with its seed (same keys, same data order), up to
float rounding of the batched matmuls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.metrics import means
from jaxtrain.core.state import TrainState
from jaxtrain.engine.calls import Carry, Data
from jaxtrain.engine.feeds import Chunk, fetch
from jaxtrain.engine.programs import Programs
from jaxtrain.train.config import FitConfig, as_arrays, validate
from jaxtrain.train.ledger import Fetched, epoch_row
from jaxtrain.train.planning import program_spec


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees (e.g. TrainStates of one model and optimizer) on a new axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
  """Member ``index`` of a stacked pytree."""
  return jax.tree.map(lambda x: x[index], tree)


def with_learning_rate(state: TrainState, learning_rate) -> TrainState:
  """Sets the injected constant learning rate of a :func:`make_optimizer` state.

  Use it on members of a stack to search learning rates in one program (a
  schedule recomputes the rate each step and would overwrite it).
  """
  def replace(node):
    if isinstance(getattr(node, "hyperparams", None), dict) and "learning_rate" in node.hyperparams:
      hyper = dict(node.hyperparams)
      hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
      return node._replace(hyperparams=hyper)
    return node

  def is_node(x):
    return isinstance(getattr(x, "hyperparams", None), dict)

  return state.replace(opt_state=jax.tree.map(replace, state.opt_state, is_leaf=is_node))


@dataclasses.dataclass
class ManyResult:
  """Results of :func:`fit_many`, one entry per member.

  Attributes:
    state: the stacked final states (member axis first).
    epochs: per-member epoch rows, ``[{column: value}, ...]`` per epoch: the
      columns of :func:`jaxtrain.fit`'s rows (``seconds`` only when
      ``on_epoch`` or ``should_stop`` made the program stop at each epoch end).
    steps: per-step metrics, arrays of shape ``[members, steps]``.
    test: per-member test metrics when a test set was given.
  """

  state: TrainState
  epochs: list[list[dict[str, float]]]
  steps: dict[str, np.ndarray]
  test: list[dict[str, float]] | None = None

  def final(self, column: str) -> np.ndarray:
    """The last epoch's ``column`` of every member."""
    return np.asarray([rows[-1][column] for rows in self.epochs])


def fit_many(states: TrainState, train: Mapping[str, Any], *, config: FitConfig,
             seeds: Sequence[int], val: Mapping[str, Any] | None = None,
             test: Mapping[str, Any] | None = None, member_data: bool = False,
             augment=None,
             on_epoch: Callable[[int, TrainState, list[Fetched]], None] | None = None,
             should_stop: Callable[[], str | None] | None = None) -> ManyResult | None:
  """Trains a stack of states, one per seed, in one compiled program.

  Args:
    states: stacked states (:func:`stack`), member axis first.
    train, val, test: arrays shared by all members, or with a leading member
      axis when ``member_data`` (e.g. data drawn from each seed).
    config: as for :func:`jaxtrain.fit`; ``seed`` is ignored (``seeds`` rule),
      early stopping and multi-device are not supported here.
    seeds: each member's seed (its shuffle, dropout and augmentation keys).
    on_epoch: called after every epoch as ``on_epoch(epoch, states, fetched)``
      (``epoch`` from 1, the stacked states then, each member's
      :class:`~jaxtrain.train.ledger.Fetched` of that epoch, for
      :func:`~jaxtrain.train.ledger.advance`); the program then ends each call
      at an epoch's end (the same numbers).
    should_stop: polled after every epoch; a reason (e.g. ``"SIGTERM"``) ends
      training there and returns None.

  Returns:
    A :class:`ManyResult`, or None when ``should_stop`` stopped it.

  >>> import jax, jax.numpy as jnp, numpy as np, jaxtrain
  >>> from jaxtrain import many
  >>> x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
  >>> arrays = {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}
  >>> model, tx = jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2), jaxtrain.make_optimizer("sgd", 0.5)
  >>> states = many.stack([jaxtrain.create_train_state(model, tx, jax.random.key(s), x[:1],
  ...     loss_fn=jaxtrain.losses.cross_entropy) for s in range(4)])
  >>> result = many.fit_many(states, arrays, val=arrays, seeds=range(4),
  ...                        config=jaxtrain.FitConfig(epochs=10, batch_size=16))
  >>> result.final("val_accuracy").shape
  (4,)
  """
  seeds = list(seeds)
  squeeze = (lambda a: {k: v[0] for k, v in a.items()}) if member_data else (lambda a: a)
  train_, val_, test_ = (as_arrays(s, n) if s is not None else None
                         for s, n in ((train, "train"), (val, "val"), (test, "test")))
  n_train = len(squeeze(train_)["targets"])
  validate(config, n_train)
  if (config.early_stopping is not None or config.reduce_lr_on_plateau is not None
      or config.devices != 1):
    raise ValueError("fit_many supports neither early_stopping, reduce_lr_on_plateau "
                     "nor devices > 1")
  members = len(jax.tree.leaves(states)[0])
  if len(seeds) != members:
    raise ValueError(f"seeds has {len(seeds)} entries for {members} stacked states")
  sizes = [len(squeeze(s)["targets"]) for s in (val_, test_) if s is not None]
  spec = program_spec(config, n_train, sizes)
  programs = Programs(spec, augment=augment, members=True, member_data=member_data)
  spe = spec.steps_per_epoch
  train_dev = programs.place(train_)
  evals = {"train": train_dev} if config.evaluate_train else {}
  if val_ is not None:
    evals["val"] = programs.place(val_)
  step_evals = evals if config.eval_every_steps else {}
  run_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  carry = Carry(programs.place(states), jnp.zeros((members,), bool))
  data = Data(train_dev, step_evals, evals)
  total, chunks = config.epochs * spe, []
  per_epoch = on_epoch is not None or should_stop is not None
  seconds, started, first = {}, time.perf_counter(), 0
  while first < total:
    end = min(first + spec.span, (first // spe + 1) * spe if per_epoch else total)
    carry, out = programs.train(carry, data, run_keys, first, end - first)
    chunks.append(Chunk(first, end - first, out.steps, out.epochs))
    first = end
    if per_epoch and first % spe == 0:
      epoch = first // spe
      jax.block_until_ready(carry.state)
      seconds[epoch - 1] = time.perf_counter() - started
      if on_epoch is not None:
        steps, sums = fetch([c for c in chunks if c.first >= (epoch - 1) * spe], spe,
                            members=True)
        on_epoch(epoch, carry.state, [
            Fetched((epoch - 1) * spe, {k: v[m] for k, v in steps.items()},
                    jax.tree.map(lambda v, m=m: v[m], sums), seconds[epoch - 1] / spe)
            for m in range(members)])
      if should_stop is not None and should_stop() and first < total:
        return None
      started = time.perf_counter()
  steps, epoch_sums = fetch(chunks, spe, members=True)
  epochs = _rows(steps, epoch_sums, spe, members, seconds)
  state = carry.state
  test_metrics = None
  if test_ is not None:
    totals = jax.device_get(programs.evaluate(state, {"test": programs.place(test_)}))
    test_metrics = [{**{k: float(v[m]) for k, v in means(totals["test"]).items()},
                     **{f"ema_{k}": float(v[m])
                        for k, v in means(totals.get("test_ema", {})).items()}}
                    for m in range(members)]
  return ManyResult(state=state, epochs=epochs, steps=steps, test=test_metrics)



def _rows(steps, epoch_sums, spe: int, members: int, seconds, first_epoch: int = 0):
  """Each member's epoch rows, as :func:`jaxtrain.fit` writes them."""
  def member(values, m, e):
    return values[m, (e - first_epoch) * spe:(e - first_epoch + 1) * spe]

  def row(m, e, sums):
    out = epoch_row(e + 1, (e + 1) * spe, jax.tree.map(lambda v: v[m], sums),
                    member(steps["loss"], m, e), member(steps["learning_rate"], m, e),
                    seconds.get(e), member(steps["penalty"], m, e) if "penalty" in steps
                    else None)
    return out if e in seconds else {k: v for k, v in out.items() if k != "seconds"}

  return [[row(m, e, sums) for e, sums in sorted(epoch_sums.items())] for m in range(members)]
