"""The reference: a per-step ``jax.jit`` loop written the way the Flax examples do.

A flax ``TrainState`` (``flax.training.train_state``), one jitted ``train_step``
returning ``(state, metrics)``, a Python loop over batches drawn by host-side
numpy shuffling every epoch (``rng.permutation`` then fancy indexing, the
incomplete last batch dropped, as in the Flax MNIST example), per-step metrics
kept on the device and fetched once per epoch, and evaluation by a jitted
``eval_step`` over batches. Evaluation sets are put on the device once and cut
into batches once per run (what a careful Flax user does; it only helps the
baseline). This is what a user writes by hand: the baseline loop and its models
use nothing from jaxtrain. (``IssueCNN(impl="matmul")``, the issue's net built
the way :mod:`jaxtrain.conv` builds convolutions, is what the *jaxtrain* rows of
that table train; it computes its convolutions with :func:`jaxtrain.conv.conv_matmul`.)
``FlaxExampleCNN`` is the Flax MNIST example's model as published.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxtrain.nn.conv import conv_matmul


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` plus batch-norm statistics."""

  batch_stats: Any = None


class MLP(nn.Module):
  """Dense layers with ReLU between them; ``features[-1]`` is the output width."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


class CNN(nn.Module):
  """jaxtrain's ``models.CNN(features=(32, 64), dense=128)`` in plain flax.

  3x3 'SAME' conv (no bias) / batch norm / ReLU / 2x2 max-pool per block, then a
  ReLU dense layer and the head; batch norm with PyTorch's momentum and epsilon.
  """

  features: Sequence[int] = (32, 64)
  dense: int = 128
  outputs: int = 10

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    for width in self.features:
      x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.outputs)(x)


class ValidConv3x3(nn.Module):
  """``nn.Conv(features, (3, 3), padding="VALID")`` with a choice of implementation."""

  features: int
  impl: str = "xla"  # "xla" (lax.conv) or "matmul" (slices + one matmul)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.impl == "matmul":
      y = conv_matmul(x, kernel, "VALID")
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class FlaxExampleCNN(nn.Module):
  """A simple CNN model (flax examples/mnist/train.py, unchanged)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


def _train_kwargs(apply_fn, train: bool) -> dict:
  """``train=`` for models that take it (the Flax example's CNN does not)."""
  module = getattr(apply_fn, "__self__", None)
  takes = module is None or "train" in inspect.signature(type(module).__call__).parameters
  return {"train": train} if takes else {}


class IssueCNN(nn.Module):
  """The issue's net: conv32-conv64-pool-dense128 (PyTorch's MNIST example ``Net``).

  Two 3x3 'VALID' convs with ReLU, ONE 2x2 max-pool, dense 128, head 10
  (28 -> 26 -> 24 -> 12; 12 * 12 * 64 = 9216 inputs to the dense layer). The
  example's two dropout layers are left out, here and in the PyTorch recipe.
  """

  impl: str = "xla"

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if x.ndim == 3:
      x = x[..., None]
    x = nn.relu(ValidConv3x3(32, self.impl)(x))
    x = nn.relu(ValidConv3x3(64, self.impl)(x))
    if self.impl == "matmul":
      b, h, w, c = x.shape
      x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    else:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


def create_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                 example_inputs) -> TrainState:
  variables = model.init(jax.random.key(seed), jnp.asarray(example_inputs),
                         **_train_kwargs(model.apply, False))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats"))


def _loss_and_correct(loss: str, logits, labels):
  if loss == "bce":  # one logit per example, 0/1 labels
    logits = logits.reshape(labels.shape)
    losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    correct = (logits > 0) == (labels > 0)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
  return losses, correct


@functools.lru_cache(maxsize=None)
def make_steps(loss: str):
  """``(train_step, eval_step)``, jitted once per loss ("ce" or "bce")."""

  @jax.jit
  def train_step(state: TrainState, batch):
    def loss_fn(params):
      if state.batch_stats is not None:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["inputs"],
            train=True, mutable=["batch_stats"])
      else:
        logits, updates = state.apply_fn({"params": params}, batch["inputs"],
                                         **_train_kwargs(state.apply_fn, True)), {}
      losses, correct = _loss_and_correct(loss, logits, batch["targets"])
      return losses.mean(), (correct, updates)

    (loss_value, (correct, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    if updates:
      state = state.replace(batch_stats=updates["batch_stats"])
    return state, {"loss": loss_value, "accuracy": correct.mean()}

  @jax.jit
  def eval_step(state: TrainState, batch):
    variables = {"params": state.params}
    if state.batch_stats is not None:
      variables["batch_stats"] = state.batch_stats
    logits = state.apply_fn(variables, batch["inputs"], **_train_kwargs(state.apply_fn, False))
    losses, correct = _loss_and_correct(loss, logits, batch["targets"])
    return {"loss_sum": losses.sum(), "correct": correct.sum(),
            "count": jnp.asarray(losses.shape[0], jnp.float32)}

  return train_step, eval_step


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict]:
  """The set cut into device-resident batches (the last one may be smaller)."""
  n = len(arrays["targets"])
  return [jax.device_put({k: v[i : i + batch_size] for k, v in arrays.items()})
          for i in range(0, n, batch_size)]


def evaluate(eval_step, state, batches) -> list:
  """Per-batch sums, still on the device."""
  return [eval_step(state, batch) for batch in batches]


def summarize(sums: list) -> dict[str, float]:
  total = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
  return {"loss": total["loss_sum"] / total["count"],
          "accuracy": total["correct"] / total["count"]}


def train(state: TrainState, train_set: Mapping[str, np.ndarray], *, epochs: int,
          batch_size: int, loss: str, seed: int = 0,
          evals: Mapping[str, Mapping[str, np.ndarray]] | None = None,
          eval_batch_size: int = 1024, eval_every_step: bool = False):
  """Trains ``epochs`` epochs; returns ``(state, history)``.

  ``history`` has one dict per epoch: the mean training loss and accuracy of its
  steps (``running_*``), and loss/accuracy of every set in ``evals`` evaluated at the epoch's end,
  or (``eval_every_step``) after every step, as per-step lists.
  """
  train_step, eval_step = make_steps(loss)
  rng = np.random.default_rng(seed)
  n = len(train_set["targets"])
  steps_per_epoch = n // batch_size
  eval_sets = {name: eval_batches(arrays, min(eval_batch_size, len(arrays["targets"])))
               for name, arrays in (evals or {}).items()}
  history = []
  for _ in range(epochs):
    perms = rng.permutation(n)[: steps_per_epoch * batch_size]
    perms = perms.reshape((steps_per_epoch, batch_size))
    batch_metrics, step_evals = [], []
    for perm in perms:
      batch = {k: v[perm, ...] for k, v in train_set.items()}
      state, metrics = train_step(state, batch)
      batch_metrics.append(metrics)
      if eval_every_step:
        step_evals.append({name: evaluate(eval_step, state, batches)
                           for name, batches in eval_sets.items()})
    epoch_sums = ({} if eval_every_step else
                  {name: evaluate(eval_step, state, batches)
                   for name, batches in eval_sets.items()})
    batch_metrics, step_evals, epoch_sums = jax.device_get(
        (batch_metrics, step_evals, epoch_sums))
    row = {f"running_{k}": float(np.mean([m[k] for m in batch_metrics]))
           for k in batch_metrics[0]}
    for name, sums in epoch_sums.items():
      row.update({f"{name}_{k}": v for k, v in summarize(sums).items()})
    if step_evals:
      for name in eval_sets:
        per_step = [summarize(s[name]) for s in step_evals]
        row[f"{name}_accuracy_steps"] = [m["accuracy"] for m in per_step]
    history.append(row)
  return state, history
