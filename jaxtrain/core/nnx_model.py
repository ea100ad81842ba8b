"""Flax NNX modules through the model boundary (:mod:`jaxtrain.core.model`).

An ``nnx.Module`` is held functionally, as Flax's "Performance considerations"
guide does in a plain ``jax.jit`` loop: ``nnx.split`` once, into a static graph
definition and its variables, and ``nnx.merge`` inside every traced pass, the
updated state returned. Which variable goes where:

* ``nnx.Param``: the parameters (``state.params``: what the optimizer, weight
  decay masks, L1/L2, EMA, clipping and histograms see);
* ``nnx.BatchStat``: the batch statistics (``state.batch_stats``), updated in
  training steps only (averaged over devices with
  ``nnx.BatchNorm(axis_name=jaxtrain.parallel.AXIS)``);
* ``nnx.RngState`` (the keys and counters of the module's own ``nnx.Rngs``):
  not state. Every pass sets each key from the pass's key, by stream and path
  (:func:`jaxtrain.core.model.stream_key`), counters at 0, so randomness is
  jaxtrain's: same seed, same bits; a resume at any step draws what the
  uninterrupted run drew (NNX's counters are never part of a run);
* ``nnx.Intermediate`` (values ``sow``\\ n): outputs of a pass, never state;
* any other kind is refused in one line naming it.

Modes: a training pass runs with ``deterministic=False,
use_running_average=False`` on every submodule that has them (``nnx.view``),
evaluation and ``predict`` with both True (Monte Carlo dropout:
``deterministic=False`` alone). A ``__call__`` that takes ``rngs`` gets an
``nnx.Rngs`` of the pass's keys. The user's module object is never mutated.
"""

from __future__ import annotations

import functools
import inspect
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.core.model import Model, call_binding_axes, eval_key, stream_key
from jaxtrain.nn import conv


def _flat(state) -> list:
  return list(nnx.to_flat_state(state))


def _path(path) -> str:
  return "/".join(str(p) for p in path)


class NNXModel(Model):
  """An ``nnx.Module`` instance as the user built it (with its own ``nnx.Rngs``):
  its graph definition is static, its variables are jaxtrain's."""

  kind = "nnx"

  def __init__(self, module):
    if not isinstance(module, nnx.Module):
      raise ValueError(f"model must be a flax.nnx.Module, got {type(module).__name__}")
    graphdef, params, stats, rng, intermediates, rest = nnx.split(
        module, nnx.Param, nnx.BatchStat, nnx.RngState, nnx.Intermediate, ...)
    del intermediates
    others = _flat(rest)
    if others:
      path, value = others[0]
      if not isinstance(value, nnx.Variable):
        raise ValueError(
            f"the NNX model holds a plain array at {_path(path)!r}: wrap it in nnx.Param "
            "(trained), nnx.BatchStat (updated in training steps) or make it a constant")
      kinds = sorted({type(v).__name__ for _, v in others})
      raise ValueError(
          f"the NNX model's variable kind(s) {', '.join(kinds)} (e.g. at {_path(path)!r}) "
          "are not supported: jaxtrain trains nnx.Param and updates nnx.BatchStat in "
          "training steps")
    self.graphdef, self._name = graphdef, type(module).__name__
    # Copies: a step that donates the state's buffers must not delete the
    # user's module's, and nothing here may hold the user's Variables.
    self._variables = {"params": _pure_copy(params)}
    if _flat(stats):
      self._variables["batch_stats"] = _pure_copy(stats)
    self._params, self._stats = _abstract(params), _abstract(stats)
    self._rng = jax.tree.map(jnp.copy, rng)
    names = set(list(inspect.signature(type(module).__call__).parameters)[1:])
    self.takes_train, self.takes_mask = "train" in names, "mask" in names
    self.takes_rngs = "rngs" in names
    self._axes = []  # the axis names its collectives use (bound when unbound)

  def __repr__(self):
    return f"NNXModel({self._name})"

  def __eq__(self, other):
    if type(other) is not type(self):
      return False
    try:
      if other.graphdef == self.graphdef:
        return True
      # Two instances of one module class differ only where a static attribute
      # compares by identity: the NNX tutorial's CNN keeps a functools.partial
      # (a new one per instance), which would recompile every new model.
      a, b = other.graphdef, self.graphdef
      return (a.nodes == b.nodes and a.num_leaves == b.num_leaves
              and len(a.attributes) == len(b.attributes)
              and all(_same_static(x, y) for x, y in zip(a.attributes, b.attributes)))
    except Exception:  # noqa: BLE001 - attributes that do not compare
      return other is self

  def __hash__(self):
    # Not the graph definition's hash: a plain dict attribute makes it unhashable.
    return hash((type(self), self._name))

  def __call__(self, *args, **kwargs):
    raise TypeError("an NNX model's state has no module.apply: use jaxtrain.predict(state, x) "
                    "or jaxtrain.to_module(state)")

  def init(self, key, inputs):
    """The module's variables as it was built (NNX initialises in ``__init__``
    from the user's ``nnx.Rngs``; ``key`` is not used)."""
    del key, inputs
    return jax.tree.map(jnp.copy, self._variables)

  def module(self, variables) -> nnx.Module:
    """A new ``nnx.Module`` holding ``variables`` (eager or traced)."""
    params = _replaced(self._params, variables["params"])
    stats = _replaced(self._stats, variables.get("batch_stats", {}))
    return nnx.merge(self.graphdef, params, stats, jax.tree.map(jnp.copy, self._rng))

  def _run(self, variables, inputs, *, train, dropout, key, mask, capture):
    module = nnx.merge(self.graphdef, _replaced(self._params, variables["params"]),
                       _replaced(self._stats, variables.get("batch_stats", {})),
                       _keyed(self._rng, key))
    _set_modes(module, deterministic=not (train or dropout), use_running_average=not train)
    conv.swap_nnx_convs(module)
    kwargs = {"train": train} if self.takes_train else {}
    if mask is not None and self.takes_mask:
      kwargs["mask"] = mask
    if self.takes_rngs:
      kwargs["rngs"] = nnx.Rngs(default=stream_key(key, "default"), dropout=key)
    if capture:
      outputs, captured = nnx.capture(module, nnx.Intermediate,
                                      method_outputs=nnx.Intermediate)(inputs, **kwargs)
      found = {}
      for path, variable in _flat(captured):
        values = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        values = values if isinstance(values, tuple) else (values,)
        name = _path(path).removesuffix("__call__").rstrip("/") or "output"
        for i, value in enumerate(values):  # one entry per call of the method
          found[name + (f"/{i}" if len(values) > 1 else "")] = value
    else:
      outputs, found = module(inputs, **kwargs), None
    return outputs, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)), found

  def rngs(self, key, variables, inputs, *, train):
    del variables, inputs, train
    return {"dropout": eval_key() if key is None else key}

  def apply(self, variables, inputs, *, train, rngs=None, mask=None, mutable=(),
            capture_intermediates=False, dropout=False):
    key = (rngs or {}).get("dropout", eval_key())
    outputs, stats, found = call_binding_axes(lambda: self._run(
        variables, inputs, train=train, dropout=dropout, key=key, mask=mask,
        capture=capture_intermediates), self._axes)
    updates = {}
    if "batch_stats" in mutable:
      updates["batch_stats"] = stats
    if capture_intermediates:
      updates["intermediates"] = found
    return outputs, updates


def _same_static(a, b) -> bool:
  """Equality of graph attributes in which ``functools.partial`` objects compare
  by their function and arguments (they compare by identity)."""
  if type(a) is not type(b):
    return False
  if isinstance(a, functools.partial):
    return (_same_static(a.func, b.func) and _same_static(a.args, b.args)
            and _same_static(a.keywords, b.keywords))
  if isinstance(a, tuple | list):
    return len(a) == len(b) and all(_same_static(x, y) for x, y in zip(a, b))
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_same_static(a[k], b[k]) for k in a)
  if isinstance(a, nnx.graphlib.Static):
    return _same_static(a.value, b.value)
  return bool(a == b)


def _set_modes(module, **modes) -> None:
  """Sets the modes on every submodule of ``module`` (one jaxtrain just merged)
  that has them: NNX's Dropout and BatchNorm, and layers of your own that keep
  the same attribute names (as ``Module.train()`` / ``eval()`` do)."""
  for _, sub in nnx.iter_graph(module):
    if isinstance(sub, nnx.Module):
      for name, value in modes.items():
        if isinstance(getattr(sub, name, None), bool | None) and hasattr(sub, name):
          setattr(sub, name, value)


def _pure_copy(state) -> dict:
  return jax.tree.map(jnp.copy, nnx.to_pure_dict(state))


def _abstract(state):
  """``state``'s structure with shapes and dtypes in place of its arrays."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), state)


def _replaced(template, pure: dict):
  """``template`` (an ``nnx.State``) with the arrays of ``pure`` (its pure dict)."""
  state = jax.tree.map(lambda v: v, template)
  if _flat(state):
    nnx.replace_by_pure_dict(state, pure)
  return state


def _keyed(rng_state, key):
  """The module's RNG state with every key drawn from ``key`` by stream and
  path, every counter at 0: randomness is the pass's, not the module's."""
  state = jax.tree.map(lambda v: v, rng_state)

  def fresh(path, variable):
    if isinstance(variable, nnx.RngKey):
      tag = getattr(variable, "tag", "default")
      return variable.replace(jax.random.fold_in(
          stream_key(key, tag), zlib.crc32(_path(path).encode()) & 0x7FFFFFFF))
    if isinstance(variable, nnx.RngCount):
      return variable.replace(jnp.zeros_like(variable.get_value()))
    return variable

  return nnx.map_state(fresh, state) if _flat(state) else state


def to_module(state) -> nnx.Module:
  """An ordinary ``nnx.Module`` holding ``state``'s trained parameters and batch
  statistics, for your own inference code (``module.eval()`` for evaluation
  mode); the module ``state`` was created from is untouched.

  >>> import jax, jaxtrain, optax
  >>> from flax import nnx
  >>> state = jaxtrain.create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1),
  ...                                     jax.random.key(0), jax.numpy.zeros((1, 3)),
  ...                                     loss_fn=jaxtrain.losses.cross_entropy)
  >>> jaxtrain.to_module(state).kernel[...].shape
  (3, 2)
  """
  model = state.model
  if not isinstance(model, NNXModel):
    raise ValueError(f"to_module needs a state of an NNX model, got a {model.kind} model's")
  return model.module(state.variables)


def with_module(state, module: nnx.Module):
  """``state`` with the parameters and batch statistics of ``module`` (an NNX
  module of the same structure, trained or loaded elsewhere); the step and
  optimizer state are kept."""
  model = state.model
  if not isinstance(model, NNXModel):
    raise ValueError(f"with_module needs a state of an NNX model, got a {model.kind} model's")
  variables = NNXModel(module).init(None, None)
  for name, current in (("params", state.params), ("batch_stats", state.batch_stats)):
    new = variables.get(name, {})
    if jax.tree.structure(new) != jax.tree.structure(current) or jax.tree.map(
        jnp.shape, new) != jax.tree.map(jnp.shape, current):
      raise ValueError(f"the module's {name} differ in structure or shape from the state's")
  return state.replace(params=variables["params"],
                       batch_stats=variables.get("batch_stats", state.batch_stats))
