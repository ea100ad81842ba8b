"""The training state: a pytree of arrays plus the static functions that use them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxtrain.core.keys import as_key, key_for
from jaxtrain.core.model import STATE_COLLECTIONS, Model, as_model, is_nnx
from jaxtrain.core.precision import LossScale, compute_dtype
from jaxtrain.core.regularize import Regularization

PyTree = Any


class TrainState(struct.PyTreeNode):
  """Everything that changes during training, and the functions that change it.

  Data fields are arrays (checkpointed, replicated, donated); ``apply_fn``, ``tx``
  and ``loss_fn`` are static: ``jit`` hashes them, so build them once per run.

  Attributes:
    step: number of updates applied so far (int32 scalar).
    params: the model's parameters.
    batch_stats: batch-norm running statistics (``{}`` when the model has none).
    opt_state: the optimizer's state.
    apply_fn: the model as :mod:`jaxtrain.core.model` adapts it (a
      :class:`~jaxtrain.core.model.Model`; for a Linen module calling it is
      ``module.apply``, for NNX see :func:`jaxtrain.to_module`), or a
      module's ``apply`` / any ``apply(variables, inputs, **kw)`` in a state
      built by hand. Every part of jaxtrain runs the model through
      :attr:`model`.
    tx: the optax transformation.
    loss_fn: ``loss_fn(outputs, targets) -> per-example loss [batch]``, given
      the model's outputs as it returned them (any pytree).
    takes_mask: whether the model's ``__call__`` takes ``mask=`` (the padding
      rows' weights > 0), which keeps padding out of batch-norm statistics;
      :func:`create_train_state` reads it from the module's signature. ``None``
      (a state built by hand): read from the module ``apply_fn`` is bound to.
    takes_train: whether ``__call__`` takes ``train=`` (dropout and batch norm
      modes); a plain module without it is called without it. ``None``: as
      for ``takes_mask`` (assumed when ``apply_fn`` is no bound module's).
    accuracy_fn: ``accuracy_fn(outputs, targets) -> [batch]`` values in [0, 1],
      logged as ``accuracy``; ``None``: the loss's own (``loss_fn.accuracy``,
      which jaxtrain's classification losses carry), if any; ``False``: none.
    metrics_fn: ``metrics_fn(outputs, targets) -> {name: per-example values
      [batch]}``: your own metrics, weighted by the mask and aggregated like
      the loss (train steps log the batch mean ``name``; evaluations return
      ``name_sum`` and the mean ``name``), or None.
    plateau: a :class:`jaxtrain.plateau.PlateauState` whose ``scale``
      multiplies every update (ReduceLROnPlateau), or None.
    regularization: L1/L2 penalty terms and input noise
      (:class:`jaxtrain.Regularization`), or None.
    ema: an exponential moving average of ``params`` (float32), updated after
      every applied update as ``decay * ema + (1 - decay) * params`` and
      starting from the initial parameters; None without one.
    ema_decay: its decay in (0, 1), or None.
    precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` to compute the model in
      that dtype with these float32 parameters as master weights
      (:mod:`jaxtrain.core.precision`).
    loss_scale: float16's dynamic :class:`~jaxtrain.core.precision.LossScale`,
      or None.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = struct.field(
      pytree_node=False
  )
  takes_mask: bool | None = struct.field(pytree_node=False, default=None)
  takes_train: bool | None = struct.field(pytree_node=False, default=None)
  metrics_fn: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = struct.field(
      pytree_node=False, default=None)
  accuracy_fn: Callable[[Any, jax.Array], jax.Array] | bool | None = struct.field(
      pytree_node=False, default=None)
  plateau: Any = None
  regularization: Regularization | None = struct.field(pytree_node=False, default=None)
  ema: PyTree = None
  ema_decay: float | None = struct.field(pytree_node=False, default=None)
  precision: str = struct.field(pytree_node=False, default="fp32")
  loss_scale: LossScale | None = None

  @property
  def variables(self) -> dict[str, PyTree]:
    """The variable collections ``apply_fn`` expects."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}

  @property
  def model(self) -> Model:
    """The model's adapter (:mod:`jaxtrain.core.model`): the one way to run it."""
    return as_model(self.apply_fn, takes_train=self.takes_train, takes_mask=self.takes_mask)

  @property
  def passes_mask(self) -> bool:
    """Whether the steps pass ``mask=`` to the model (see ``takes_mask``)."""
    return self.model.takes_mask

  @property
  def passes_train(self) -> bool:
    """Whether the steps pass ``train=`` to the model (see ``takes_train``)."""
    return self.model.takes_train

  @property
  def accuracy(self) -> Callable[[Any, jax.Array], jax.Array] | None:
    """The per-example accuracy logged as ``accuracy``, or None (see ``accuracy_fn``)."""
    if self.accuracy_fn is False:
      return None
    return self.accuracy_fn or getattr(self.loss_fn, "accuracy", None)

  def apply_gradients(self, grads: PyTree, **changes) -> TrainState:
    """Returns the state after one optimizer update with ``grads``.

    With a loss scale (float16), an update whose gradients are not all finite
    is skipped (the step still counts, ``changes`` still apply) and the scale
    halves; after enough finite updates in a row it doubles."""
    if self.loss_scale is not None:
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      plain = self.replace(loss_scale=None)
      state = jax.lax.cond(finite, lambda s: s.apply_gradients(grads, **changes),
                           lambda s: s.replace(step=s.step + 1, **changes), plain)
      return state.replace(loss_scale=self.loss_scale.update(finite))
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    if self.plateau is not None:
      # The learning rate is the last factor of an update: scaling the update
      # scales it (SGD with momentum, Adam and AdamW keep their moments).
      updates = jax.tree.map(lambda u: u * self.plateau.scale.astype(u.dtype), updates)
    params = optax.apply_updates(self.params, updates)
    if self.ema is not None:
      d = self.ema_decay
      changes["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype),
                                    self.ema, params)
    return self.replace(
        step=self.step + 1, params=params, opt_state=opt_state, **changes
    )

  def with_ema_params(self) -> TrainState:
    """This state with the EMA in place of ``params`` (for evaluating it)."""
    return self.replace(params=jax.tree.map(lambda e, p: e.astype(p.dtype), self.ema,
                                            self.params))


def create_train_state(
    model,
    tx: optax.GradientTransformation,
    key,
    example_inputs,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    metrics_fn: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None,
    regularization: Regularization | None = None,
    ema_decay: float | None = None,
    precision: str = "fp32",
    accuracy: Callable[[Any, jax.Array], jax.Array] | bool | None = None,
    method: str | None = None,
) -> TrainState:
  """Initialises a model's variables and the optimizer state.

  Args:
    model: a ``flax.linen.Module`` as published (see :mod:`jaxtrain.core.model`
      for what it is passed: ``train=`` and ``mask=`` where its ``__call__``
      names them, every RNG stream it asks for, a bound axis for its
      collectives), or a :class:`~jaxtrain.core.model.Model`.
    tx: the optimizer, e.g. from :func:`jaxtrain.make_optimizer`.
    key: the init key (typed or legacy). Parameters and init-time dropout draw
      from keys derived from it by use.
    example_inputs: an array with a leading batch axis (one row is enough).
    loss_fn: per-example loss, ``loss_fn(outputs, targets) -> [batch]``.
    metrics_fn: your own per-example metrics (see :class:`TrainState`), e.g.
      ``lambda out, y: {"top2": (jnp.argsort(out)[:, -2:] == y[:, None]).any(-1)}``.
    regularization: L1/L2 terms added to the loss and input noise
      (:class:`jaxtrain.Regularization`), or None.
    ema_decay: keep an exponential moving average of the parameters with this
      decay in (0, 1) (see :class:`TrainState`); evaluations then also report
      it (``val_ema_loss``, ...). None: no average.
    precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (with dynamic loss
      scaling): the dtype the model computes in; parameters, optimizer state
      and batch statistics stay float32 (:mod:`jaxtrain.core.precision`).
    accuracy: ``accuracy(outputs, targets) -> [batch]`` values in [0, 1], logged
      as ``accuracy``; None: the loss's own (``loss_fn.accuracy``: jaxtrain's
      ``cross_entropy``, ``binary_cross_entropy_with_logits`` and ``hinge``
      carry one; a loss of your own or a regression loss logs none); False:
      no accuracy.
    method: the module's method to train instead of ``__call__`` (its name).

  Returns:
    A :class:`TrainState` at step 0.

  >>> import jaxtrain
  >>> state = jaxtrain.create_train_state(
  ...     jaxtrain.models.MLP(hidden_sizes=(4,), outputs=2),
  ...     jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0),
  ...     jnp.zeros((1, 3)), loss_fn=jaxtrain.losses.cross_entropy)
  >>> int(state.step), state.params["Dense_0"]["kernel"].shape
  (0, (3, 4))
  """
  if not (isinstance(model, nn.Module | Model) or is_nnx(model)):
    raise ValueError(f"model must be a flax.linen.Module or a flax.nnx.Module instance, got "
                     f"{getattr(model, '__name__', type(model).__name__)}")
  model = as_model(model, method=method)
  if accuracy is not None and accuracy is not False and not callable(accuracy):
    raise ValueError(f"accuracy must be callable, None or False, got {accuracy!r}")
  if metrics_fn is not None and not callable(metrics_fn):
    raise ValueError(f"metrics_fn must be callable or None, got {metrics_fn!r}")
  if regularization is not None and not isinstance(regularization, Regularization):
    raise ValueError(f"regularization must be a jaxtrain.Regularization or None, got "
                     f"{regularization!r}")
  if ema_decay is not None and (isinstance(ema_decay, bool) or not isinstance(
      ema_decay, int | float) or not 0 < ema_decay < 1):
    raise ValueError(f"--ema (the EMA decay) must be in (0, 1), got {ema_decay!r}")
  compute_dtype(precision)  # checks the name
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
  try:
    example_inputs = jnp.asarray(example_inputs)
  except (TypeError, ValueError):
    raise ValueError("example_inputs must be one array of shape [batch, ...] (a model of "
                     "several inputs takes them stacked or concatenated in one array), got "
                     f"a {type(example_inputs).__name__}") from None
  if example_inputs.ndim < 2:
    raise ValueError(
        "example_inputs must have a leading batch axis (shape [batch, ...]), got "
        f"shape {example_inputs.shape}"
    )
  key = as_key(key)
  variables = dict(model.init(key_for(key, "init"), example_inputs))
  for transient in ("intermediates",):
    variables.pop(transient, None)
  unknown = sorted(set(variables) - {"params", *STATE_COLLECTIONS})
  if unknown:
    raise ValueError(
        f"the model's variable collection(s) {', '.join(map(repr, unknown))} are not supported: "
        "jaxtrain trains 'params' and updates 'batch_stats' in training steps")
  params = variables.get("params", {})
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      apply_fn=model,
      tx=tx,
      loss_fn=loss_fn,
      metrics_fn=metrics_fn,
      regularization=regularization if regularization != Regularization() else None,
      ema=None if ema_decay is None else jax.tree.map(
          lambda p: jnp.asarray(p, jnp.float32), params),
      ema_decay=None if ema_decay is None else float(ema_decay),
      precision=precision,
      loss_scale=LossScale.create() if precision == "fp16" else None,
      takes_mask=model.takes_mask,
      takes_train=model.takes_train,
      accuracy_fn=accuracy,
  )


def state_arrays(state: TrainState) -> dict[str, Any]:
  """The array part of a TrainState as a plain dict (what checkpoints hold)."""
  arrays = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}
  if state.plateau is not None:
    arrays["plateau"] = state.plateau
  if state.ema is not None:
    arrays["ema"] = state.ema
  if state.loss_scale is not None:
    arrays["loss_scale"] = state.loss_scale
  return arrays


def with_arrays(state: TrainState, arrays: dict[str, Any]) -> TrainState:
  """``state`` with the arrays of :func:`state_arrays` (or a subset) replaced."""
  return state.replace(**arrays)
