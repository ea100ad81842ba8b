"""The pure per-device steps: ``train_step`` and ``eval_step``.

Both are written once for one device; with ``axis_name`` they run unchanged under
``jax.pmap`` and ``jax.shard_map`` (sums and gradients are reduced over the named
axis), and without it under ``jax.jit``, also on a sharded global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain.core.keys import as_key, key_for
from jaxtrain.core.metrics import means, safe_divide, summarize, weighted_sum
from jaxtrain.core.precision import cast_floats, compute_dtype
from jaxtrain.core.state import TrainState

__all__ = ["accumulate_gradients", "check_batch", "compute_gradients", "eval_step", "per_example_correct",
           "summarize", "train_step"]

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def check_batch(batch: Batch) -> int:
  """Checks a batch's structure and returns its (per-device) size.

  Shapes are static, so this runs at trace time and costs nothing per step.
  """
  if not isinstance(batch, Mapping) or not {"inputs", "targets"} <= set(batch):
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"batch must be a dict with 'inputs' and 'targets', got {keys}")
  inputs, targets = batch["inputs"], batch["targets"]
  if jnp.ndim(inputs) < 1 or jnp.ndim(targets) < 1:
    raise ValueError(
        "batch['inputs'] and batch['targets'] need a leading batch axis, got shapes "
        f"{jnp.shape(inputs)} and {jnp.shape(targets)}"
    )
  n = jnp.shape(inputs)[0]
  if jnp.shape(targets)[0] != n:
    raise ValueError(
        f"batch['targets'] has {jnp.shape(targets)[0]} rows but batch['inputs'] "
        f"has {n}"
    )
  if "mask" in batch and jnp.shape(batch["mask"]) != (n,):
    raise ValueError(
        f"batch['mask'] must have shape ({n},), got {jnp.shape(batch['mask'])}"
    )
  return n


def _forward(state: TrainState, params, batch: Batch, weights, *, train: bool, key=None):
  """Runs the model through its adapter; returns outputs and the (possibly
  updated) batch stats. ``key``: the step's key (every RNG stream the model
  asks for derives from it); None in evaluation (a fixed key)."""
  low = state.precision != "fp32"
  inputs = batch["inputs"]
  if low:  # compute in bf16/fp16 from the float32 master weights
    dtype = compute_dtype(state.precision)
    params, inputs = cast_floats(params, dtype), cast_floats(inputs, dtype)
  variables = {**state.variables, "params": params}
  model = state.model
  # Our models pass the mask to batch norm so padded rows do not enter the batch
  # statistics; a model without that keyword still works (its batch norm then
  # sees padding rows in the one ragged batch of an epoch; fit warns).
  outputs, updates = model.apply(
      variables, inputs, train=train, mask=weights > 0 if train else None,
      rngs=model.rngs(key if train else None, variables, inputs, train=train),
      mutable=("batch_stats",) if train and state.batch_stats else ())
  if train and state.batch_stats:
    stats = jax.tree.map(lambda new, old: new.astype(old.dtype), updates["batch_stats"],
                         state.batch_stats)
    return _as_fp32(outputs, low), stats
  return _as_fp32(outputs, low), state.batch_stats


def _as_fp32(outputs, low: bool):
  return cast_floats(outputs, jnp.float32) if low else outputs


def _per_example_loss(state: TrainState, outputs, targets, n: int) -> jax.Array:
  per_example = state.loss_fn(outputs, targets)
  if jnp.shape(per_example) != (n,):
    raise ValueError(
        f"loss_fn must return per-example losses of shape ({n},), got shape "
        f"{jnp.shape(per_example)}"
    )
  return per_example.astype(jnp.float32)


def per_example_correct(state: TrainState, outputs, targets, n: int) -> jax.Array | None:
  """Per-example accuracy in [0, 1] from ``state.accuracy`` (the loss's own,
  or the one given to :func:`~jaxtrain.create_train_state`), or None: a loss
  without one logs no accuracy, whatever the targets' dtype."""
  accuracy = state.accuracy
  if accuracy is None:
    return None
  correct = accuracy(outputs, targets)
  if jnp.shape(correct) != (n,):
    raise ValueError(f"the accuracy function must return one value per example, shape "
                     f"({n},), got shape {jnp.shape(correct)}")
  return jnp.asarray(correct, jnp.float32)


def _weights(batch: Batch, n: int) -> jax.Array:
  if "mask" in batch:
    return jnp.asarray(batch["mask"], jnp.float32)
  return jnp.ones((n,), jnp.float32)


def _varying(tree, axis_name):
  """Marks replicated leaves as device-varying before differentiation.

  Under ``shard_map`` the gradient of a replicated (invariant) input is already
  summed over the axis by autodiff; under ``pmap`` inputs are varying and it is
  not. Making the parameters varying gives both the per-device gradient, which
  the explicit ``psum`` below then sums exactly once.
  """
  if axis_name is None:
    return tree

  def cast(x):
    aval = jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    varying = axis_type.varying if axis_type is not None else getattr(aval, "vma", None)
    if varying is None or axis_name in varying:
      return x
    return jax.lax.pcast(x, axis_name, to="varying")

  return jax.tree.map(cast, tree)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def compute_gradients(
    state: TrainState, batch: Batch, key, *, axis_name: str | None = None
) -> tuple[Any, Any, Metrics]:
  """The global-batch gradient, new batch statistics and metrics; no update.

  This is :func:`train_step` without the optimizer (for gradient histograms,
  gradient accumulation or custom updates); see it for the arguments.

  Returns:
    ``(grads, batch_stats, metrics)``.
  """
  n = check_batch(batch)
  key = as_key(key)
  reg = state.regularization
  if reg is not None and reg.input_noise:
    first_row = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
    batch = {**batch, "inputs": reg.noisy(batch["inputs"], key_for(key, "input_noise"),
                                          first_row)}
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  weights = _weights(batch, n)
  # Dividing each device's weighted sum by the *global* count makes the psum of
  # the per-device gradients exactly the gradient of the global-batch mean, even
  # when padding leaves the devices with different counts.
  count = _psum(jnp.sum(weights), axis_name)
  denominator = jnp.where(count > 0, count, 1.0)

  scale = None if state.loss_scale is None else state.loss_scale.scale

  def objective(params):
    outputs, batch_stats = _forward(state, params, batch, weights, train=True, key=key)
    per_example = _per_example_loss(state, outputs, batch["targets"], n)
    loss = weighted_sum(per_example, weights) / denominator
    # float16: the gradient of the scaled loss, so small gradients stay normal.
    return loss if scale is None else loss * scale, (loss, outputs, batch_stats)

  (_, (local_loss, outputs, batch_stats)), grads = jax.value_and_grad(
      objective, has_aux=True
  )(_varying(state.params, axis_name))
  if scale is not None:
    grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  metrics = {"loss": _psum(local_loss, axis_name)}
  if reg is not None and reg.penalizes:
    # Of the replicated parameters, once (not per device, not psummed).
    metrics["penalty"], penalty_grads = jax.value_and_grad(reg.penalty)(state.params)
    grads = jax.tree.map(lambda g, p: g + p.astype(g.dtype), grads, penalty_grads)
  metrics.update(grad_norm=optax.tree.norm(grads), count=count)
  if scale is not None:
    metrics["loss_scale"] = scale
  correct = per_example_correct(state, outputs, batch["targets"], n)
  if correct is not None:
    metrics["accuracy"] = safe_divide(
        _psum(weighted_sum(correct, weights), axis_name), count
    )
  for name, total in _own_sums(state, outputs, batch["targets"], weights, n, axis_name).items():
    metrics[name[: -len("_sum")]] = safe_divide(total, count)
  return grads, batch_stats, metrics


def accumulate_gradients(
    state: TrainState, batch: Batch, key, micro_batches: int, *,
    axis_name: str | None = None
) -> tuple[Any, Any, Metrics]:
  """:func:`compute_gradients` over ``micro_batches`` equal slices of ``batch``,
  one after the other, combined into the gradient of the whole batch.

  Gradient accumulation: activations are held for one micro-batch at a time,
  and the result equals :func:`compute_gradients` on the whole batch (up to
  float rounding) for models without batch norm; batch statistics are updated
  micro-batch by micro-batch, as in PyTorch. Each slice's gradient and metrics
  are weighted by its examples (its ``count``), so padded slices count for what
  they hold. Slice ``k`` draws dropout from ``fold_in(key, k)``.

  Returns:
    ``(grads, batch_stats, metrics)`` as :func:`compute_gradients`.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0),
  ...     jnp.zeros((1, 2)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> batch = {"inputs": jax.random.normal(jax.random.key(1), (8, 2)),
  ...          "targets": jnp.array([0, 1] * 4)}
  >>> whole, _, _ = compute_gradients(state, batch, jax.random.key(2))
  >>> parts, _, _ = accumulate_gradients(state, batch, jax.random.key(2), 4)
  >>> bool(jnp.allclose(whole["Dense_0"]["kernel"], parts["Dense_0"]["kernel"], atol=1e-6))
  True
  """
  n = check_batch(batch)
  if micro_batches == 1:
    return compute_gradients(state, batch, key, axis_name=axis_name)
  if not isinstance(micro_batches, int) or micro_batches < 1 or n % micro_batches:
    raise ValueError(f"micro_batches must be a positive integer dividing the batch's {n} "
                     f"rows, got {micro_batches!r}")
  key = as_key(key)
  batch = {**batch, "mask": _weights(batch, n)}
  slices = jax.tree.map(lambda v: v.reshape((micro_batches, n // micro_batches) + v.shape[1:]),
                        dict(batch))
  zeros = jax.tree.map(jnp.zeros_like, state.params)

  def body(carry, xs):
    grad_sum, batch_stats, sums = carry
    k, micro = xs
    grads, batch_stats, metrics = compute_gradients(
        state.replace(batch_stats=batch_stats), micro, jax.random.fold_in(key, k),
        axis_name=axis_name)
    count = metrics["count"]
    grad_sum = jax.tree.map(lambda total, g: total + g * count, grad_sum, grads)
    sums = {name: sums[name] + (metrics[name] * count if name != "count" else count)
            for name in sums}
    return (grad_sum, batch_stats, sums), None

  first = jax.eval_shape(lambda: compute_gradients(
      state, jax.tree.map(lambda v: v[0], slices), key, axis_name=axis_name)[2])
  sums = {name: jnp.zeros((), jnp.float32) for name in first if name != "grad_norm"}
  (grad_sum, batch_stats, sums), _ = jax.lax.scan(
      body, (zeros, state.batch_stats, sums), (jnp.arange(micro_batches), slices))
  count = sums["count"]
  grads = jax.tree.map(lambda g: (g / jnp.where(count > 0, count, 1.0)).astype(g.dtype),
                       grad_sum)
  metrics = {name: value if name == "count" else safe_divide(value, count)
             for name, value in sums.items()}
  metrics["grad_norm"] = optax.tree.norm(grads)
  return grads, batch_stats, {k: metrics[k] for k in first}


def train_step(
    state: TrainState, batch: Batch, key, *, axis_name: str | None = None
) -> tuple[TrainState, Metrics]:
  """One optimizer update on a batch. Pure: the same inputs give the same bits.

  Args:
    state: the current :class:`~jaxtrain.TrainState`.
    batch: ``{"inputs": x, "targets": y}`` and optionally ``"mask"``, a per-example
      weight (0 for padding rows, which then change nothing).
    key: drives dropout (typed or legacy key); fold the global step into it so the
      run is a pure function of its seed.
    axis_name: the mapped axis under ``pmap``/``shard_map``. Gradients and metrics
      are then those of the whole global batch, batch statistics are averaged over
      devices, and each device folds its axis index into ``key``.

  Returns:
    ``(new_state, metrics)`` with scalar ``loss`` (mask-weighted mean over the
    global batch), ``grad_norm`` (global L2 norm of the global-batch gradient,
    before clipping), ``count`` (sum of weights) and ``accuracy`` for class labels.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0),
  ...     jnp.zeros((1, 2)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> batch = {"inputs": jnp.ones((4, 2)), "targets": jnp.array([0, 1, 1, 0])}
  >>> state, metrics = jax.jit(jaxtrain.train_step)(state, batch, jax.random.key(1))
  >>> int(state.step), sorted(metrics)
  (1, ['accuracy', 'count', 'grad_norm', 'loss'])
  """
  grads, batch_stats, metrics = compute_gradients(state, batch, key, axis_name=axis_name)
  return state.apply_gradients(grads, batch_stats=batch_stats), metrics


def eval_step(state: TrainState, batch: Batch, *, axis_name: str | None = None) -> Metrics:
  """Evaluates a batch: dropout off, batch norm on its running averages.

  Returns sums and counts so that an epoch aggregates exactly over ragged, padded
  batches (see :func:`jaxtrain.summarize`): ``loss_sum``, ``count``, ``correct`` (for class
  labels) and, for convenience, this batch's ``loss`` and ``accuracy``.

  >>> import jax, jax.numpy as jnp, jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0),
  ...     jnp.zeros((1, 2)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> batch = {"inputs": jnp.ones((4, 2)), "targets": jnp.array([0, 1, 1, 0]),
  ...          "mask": jnp.array([1., 1., 1., 0.])}
  >>> float(jax.jit(jaxtrain.eval_step)(state, batch)["count"])
  3.0
  """
  n = check_batch(batch)
  weights = _weights(batch, n)
  outputs, _ = _forward(state, state.params, batch, weights, train=False)
  per_example = _per_example_loss(state, outputs, batch["targets"], n)
  sums = {
      "loss_sum": _psum(weighted_sum(per_example, weights), axis_name),
      "count": _psum(jnp.sum(weights), axis_name),
  }
  correct = per_example_correct(state, outputs, batch["targets"], n)
  if correct is not None:
    sums["correct"] = _psum(weighted_sum(correct, weights), axis_name)
  sums.update(_own_sums(state, outputs, batch["targets"], weights, n, axis_name))
  return {**sums, **means(sums)}


_RESERVED = ("loss", "accuracy", "count", "grad_norm", "finite", "learning_rate", "penalty",
             "loss_scale")


def _own_sums(state: TrainState, outputs, targets, weights, n: int, axis_name):
  """``{name_sum: masked sum}`` of ``state.metrics_fn``'s per-example values."""
  if state.metrics_fn is None:
    return {}
  values = state.metrics_fn(outputs, targets)
  if not isinstance(values, dict):
    raise ValueError(f"metrics_fn must return a dict of per-example values, got "
                     f"{type(values).__name__}")
  sums = {}
  for name, value in values.items():
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
      raise ValueError(f"metrics_fn's metric name {name!r} must be an identifier other than "
                       f"{', '.join(_RESERVED)}")
    if jnp.shape(value) != (n,):
      raise ValueError(f"metrics_fn's {name!r} must have shape ({n},) (one value per "
                       f"example), got {jnp.shape(value)}")
    sums[f"{name}_sum"] = _psum(weighted_sum(jnp.asarray(value, jnp.float32), weights),
                                axis_name)
  return sums
