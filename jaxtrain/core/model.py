"""The one boundary between jaxtrain and a model: :class:`Model`.

Every part of jaxtrain that runs a model (the steps, the compiled programs,
``predict``, activations, the execution planner, checkpoints) asks a
:class:`Model` and never the module's class, signature or hash. A model is
turned into one pure apply::

    outputs, updates = model.apply(variables, inputs, train=..., rngs=..., mask=...,
                                   mutable=("batch_stats",))

plus its variable collections (``model.init``). :func:`as_model` makes one from
a Linen module (:class:`~jaxtrain.core.linen_model.LinenModel`), an NNX module
(:class:`~jaxtrain.core.nnx_model.NNXModel`) or an ``apply_fn`` of a state built
by hand (:class:`FunctionModel`).

What jaxtrain passes to a Linen module:

* ``train=`` and ``mask=`` only when its ``__call__`` names them;
* every RNG stream the module asks for with ``self.make_rng(name)``, found by
  tracing it once: in a training step the stream ``"dropout"`` gets the step's
  key itself and any other stream ``name`` gets :func:`stream_key` ``(key,
  name)``, both folded per device under ``pmap``/``shard_map``; evaluations get
  the same streams from a fixed key, so they are deterministic;
* a key for each required ``__call__`` argument named ``rng``, ``key``,
  ``<stream>_rng`` or ``<stream>_key`` (flax's VAE example takes ``z_rng``):
  the key of that stream, by the same rule;
* a collective over a named axis that nothing binds (flax's ResNet has
  ``nn.BatchNorm(axis_name="batch")``) runs under a size-1 ``vmap`` of that name,
  so the same model definition trains on one device (with the numbers of the
  model without ``axis_name``) and on many.

Any output pytree is passed on as the module returned it.
"""

from __future__ import annotations

import collections
import copy
import functools
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

#: Collections a model may update in a training step (its state).
STATE_COLLECTIONS = ("batch_stats",)
# Collections that are outputs of a pass, never state.
_TRANSIENT = ("intermediates",)
MAX_DISCOVERY = 32


def stream_key(key: jax.Array, stream: str) -> jax.Array:
  """The key of RNG stream ``stream`` derived from a step's ``key``:
  ``key`` itself for ``"dropout"`` (so dropout draws what it always drew),
  else ``fold_in(key, crc32(stream))``: a pure function of the step's key and
  the stream's name, so every stream is as reproducible and resumable as dropout.

  >>> k = jax.random.key(0)
  >>> bool((jax.random.key_data(stream_key(k, "dropout")) == jax.random.key_data(k)).all())
  True
  >>> a, b = stream_key(k, "z"), stream_key(k, "noise")
  >>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
  True
  """
  if stream == "dropout":
    return key
  return jax.random.fold_in(key, zlib.crc32(stream.encode()) & 0x7FFFFFFF)


#: The key evaluations draw their streams from (dropout is off there; streams
#: such as a VAE's sampling still draw, deterministically).
def eval_key() -> jax.Array:
  return jax.random.key(0x5EED)


def _axis_bound(name: str) -> bool:
  try:
    jax.lax.axis_size(name)
    return True
  except NameError:
    return False


def _with_axes(fn, axes):
  """``fn()`` with each unbound axis of ``axes`` bound by a size-1 ``vmap``:
  its collectives then reduce over one member (the identity)."""
  unbound = [a for a in axes if not _axis_bound(a)]
  if not unbound:
    return fn()
  for name in unbound:
    fn = functools.partial(_vmapped_once, fn, name)
  return fn()


def _unbound_axis(error: NameError) -> str | None:
  found = re.search(r"unbound axis name: (\S+?)\.", str(error))
  return found.group(1) if found else None


def call_binding_axes(fn, axes: list[str]):
  """``fn()`` with every axis of ``axes`` that nothing binds bound by a size-1
  ``vmap``; an unbound axis met on the way joins ``axes`` (a model's list of
  the axis names it uses, which only grows) and the call is traced again.

  Whether an axis is bound is asked at every trace, never cached: the same
  model runs under ``shard_map`` (bound) and on one device (unbound)."""
  for _ in range(MAX_DISCOVERY):
    try:
      return _with_axes(fn, tuple(axes))
    except NameError as e:
      name = _unbound_axis(e)
      if name is None or name in axes:
        raise
      axes.append(name)
  raise RuntimeError(f"a model needs more than {MAX_DISCOVERY} axis names")


def _vmapped_once(fn, name):
  out = jax.vmap(lambda _: fn(), axis_name=name, axis_size=1)(jnp.zeros((1,)))
  return jax.tree.map(lambda a: a[0], out)


class Model:
  """A model as jaxtrain sees it: ``init`` and one pure ``apply``.

  Attributes:
    takes_train: whether the model is told ``train=``.
    takes_mask: whether it is given ``mask=`` (padding rows' weights > 0).
  """

  kind = "function"
  takes_train: bool = True
  takes_mask: bool = False

  def init(self, key, inputs) -> dict[str, PyTree]:
    raise NotImplementedError

  def apply(self, variables, inputs, *, train: bool, rngs=None, mask=None, mutable=(),
            capture_intermediates: bool = False, dropout: bool = False):
    """Runs the model; returns ``(outputs, {collection: updated})``.

    ``train``: dropout and batch statistics in training mode; ``dropout``
    with ``train=False``: dropout drawn anyway, batch norm on its running
    averages (Monte Carlo dropout); ``capture_intermediates``: every
    submodule's output in ``updates["intermediates"]``."""
    raise NotImplementedError

  def rngs(self, key, variables, inputs, *, train: bool) -> dict[str, jax.Array]:
    """Every stream's key for one pass (``key``: the step's; None: evaluation)."""
    del variables, inputs, train
    return {} if key is None else {"dropout": key}


class FunctionModel(Model):
  """An ``apply_fn(variables, inputs, **kwargs)`` of a state built by hand."""

  def __init__(self, apply_fn, *, takes_train: bool = True, takes_mask: bool = False):
    self.apply_fn, self.takes_train, self.takes_mask = apply_fn, takes_train, takes_mask

  def __call__(self, *args, **kwargs):
    return self.apply_fn(*args, **kwargs)

  def apply(self, variables, inputs, *, train, rngs=None, mask=None, mutable=(),
            capture_intermediates=False, dropout=False):
    if capture_intermediates:
      raise ValueError("a hand-built apply_fn has no activations: build the state with "
                       "create_train_state(module, ...)")
    if dropout:  # Monte Carlo dropout of the Linen modules it calls
      import flax.linen as nn

      from jaxtrain.core.linen_model import dropout_on

      with nn.intercept_methods(dropout_on):
        return self.apply(variables, inputs, train=train, rngs=rngs, mask=mask,
                          mutable=mutable)
    kwargs = {"train": train} if self.takes_train else {}
    if mask is not None and self.takes_mask:
      kwargs["mask"] = mask
    if rngs:
      kwargs["rngs"] = rngs
    if mutable:
      return self.apply_fn(variables, inputs, mutable=list(mutable), **kwargs)
    return self.apply_fn(variables, inputs, **kwargs), {}

  def __eq__(self, other):
    return (type(other) is type(self) and self.apply_fn == other.apply_fn
            and (self.takes_train, self.takes_mask) == (other.takes_train, other.takes_mask))

  def __hash__(self):
    return hash((type(self), self.takes_train, self.takes_mask))


# Adapters of bound ``module.apply`` functions (states built by hand), by
# (apply, takes_train, takes_mask): the most recent few, so none leaks.
_ADAPTED: collections.OrderedDict = collections.OrderedDict()
_ADAPTED_SIZE = 64


def as_model(model_or_apply, *, takes_train: bool | None = None,
             takes_mask: bool | None = None, method: str | None = None) -> Model:
  """The :class:`Model` for a Linen or NNX module, a :class:`Model`, or a
  state's ``apply_fn`` (a module's bound ``apply`` or any function).
  ``takes_train`` and ``takes_mask``, when given, say what the model is passed
  (a state's own fields override its adapter's).

  >>> import flax.linen as nn
  >>> model = as_model(nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)]))
  >>> model.kind, model.takes_train
  ('linen', False)
  """
  import flax.linen as nn

  from jaxtrain.core.linen_model import LinenModel

  if isinstance(model_or_apply, Model):
    return _with_flags(model_or_apply, takes_train, takes_mask)
  if isinstance(model_or_apply, nn.Module):
    return _with_flags(LinenModel(model_or_apply, method=method), takes_train, takes_mask)
  if is_nnx(model_or_apply):
    if method is not None:
      raise ValueError("method= is for Linen modules; call an NNX module's method from a "
                       "module of your own")
    from jaxtrain.core.nnx_model import NNXModel
    return _with_flags(NNXModel(model_or_apply), takes_train, takes_mask)
  module = getattr(model_or_apply, "__self__", None)
  if isinstance(module, nn.Module) and getattr(model_or_apply, "__name__", "") == "apply":
    key = (model_or_apply, takes_train, takes_mask)
    try:
      _ADAPTED.move_to_end(key)
      return _ADAPTED[key]
    except (KeyError, TypeError):  # TypeError: a module whose fields do not hash
      pass
    adapted = _with_flags(LinenModel(module), takes_train, takes_mask)
    try:
      _ADAPTED[key] = adapted
      if len(_ADAPTED) > _ADAPTED_SIZE:
        _ADAPTED.popitem(last=False)
    except TypeError:
      pass
    return adapted
  if not callable(model_or_apply) or isinstance(model_or_apply, type):
    raise ValueError(f"model must be a flax.linen.Module or a flax.nnx.Module instance, got "
                     f"{getattr(model_or_apply, '__name__', type(model_or_apply).__name__)}")
  return FunctionModel(model_or_apply, takes_train=True if takes_train is None else takes_train,
                       takes_mask=bool(takes_mask))


def _with_flags(model: Model, takes_train, takes_mask) -> Model:
  """``model``, or a copy told ``train=``/``mask=`` as the flags say."""
  flags = {name: value for name, value in (("takes_train", takes_train),
                                           ("takes_mask", takes_mask))
           if value is not None and value != getattr(model, name)}
  if not flags:
    return model
  model = copy.copy(model)
  for name, value in flags.items():
    setattr(model, name, value)
  return model


def is_nnx(obj) -> bool:
  import sys

  nnx = sys.modules.get("flax.nnx")  # an NNX module means flax.nnx was imported
  return nnx is not None and isinstance(obj, nnx.Module)
