"""Linen modules through the model boundary (:mod:`jaxtrain.core.model`)."""

from __future__ import annotations

import functools
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.core.model import (
  MAX_DISCOVERY,
  STATE_COLLECTIONS,
  Model,
  call_binding_axes,
  eval_key,
  stream_key,
)

_KEY_ARG = re.compile(r"^(?:(?P<stream>\w+?)_)?(?:rng|key)$")


def dropout_on(next_fun, args, kwargs, context):
  """An interceptor that makes ``nn.Dropout`` drop even when deterministic, as
  flax's own Dropout does in training (same key, same mask): Monte Carlo
  dropout of any Linen model, left unchanged."""
  module = context.module
  if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  inputs = args[0]
  rate = module.rate
  if rate == 0.0:
    return inputs
  if rate == 1.0:
    return jnp.zeros_like(inputs)
  rng = kwargs.get("rng")
  if rng is None:
    rng = module.make_rng(module.rng_collection)
  shape = list(inputs.shape)
  for dim in module.broadcast_dims:
    shape[dim] = 1
  keep = jax.random.bernoulli(rng, p=1.0 - rate, shape=shape)
  keep = jnp.broadcast_to(keep, inputs.shape)
  return jax.lax.select(keep, inputs / (1.0 - rate), jnp.zeros_like(inputs))


class LinenModel(Model):
  """A ``flax.linen.Module`` as published: any fields (lists, dicts, submodules
  built in ``setup``), any output pytree, ``method=`` for a method other than
  ``__call__``. Calling it is ``module.apply`` (so it serves as a state's
  ``apply_fn``).
  """

  kind = "linen"

  def __init__(self, module, *, method: str | None = None):
    if not isinstance(module, nn.Module):
      raise ValueError(f"model must be a flax.linen.Module, got {type(module).__name__}")
    if method is not None and not callable(getattr(module, method, None)):
      raise ValueError(f"model {type(module).__name__} has no method {method!r}")
    self.module, self.method = module, method
    fn = getattr(type(module), method or "__call__")
    params = list(inspect.signature(fn).parameters.values())[1:]  # without self
    names = {p.name for p in params}
    self.takes_train, self.takes_mask = "train" in names, "mask" in names
    first = params[0] if params else None
    self._key_args = {}
    for p in params[1:]:
      if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("train", "mask"):
        continue
      match = _KEY_ARG.match(p.name)
      if match and p.default is p.empty:
        self._key_args[p.name] = match.group("stream") or p.name
      elif p.default is p.empty:
        raise ValueError(
            f"{type(module).__name__}.{method or '__call__'} takes a required argument "
            f"{p.name!r} that jaxtrain cannot supply: jaxtrain passes (inputs, train=, mask=) "
            "and keys for arguments named rng, key, <stream>_rng or <stream>_key; give "
            f"{p.name!r} a default")
    if first is None or first.kind is first.VAR_KEYWORD:
      raise ValueError(f"{type(module).__name__}.{method or '__call__'} takes no inputs "
                       "argument")
    self._found = {}  # (train, shapes) -> streams
    self._axes = []  # the axis names its collectives use (bound when unbound)

  def __call__(self, variables, *args, **kwargs):
    if self.method is not None:
      kwargs.setdefault("method", self.method)
    return self.module.apply(variables, *args, **kwargs)

  def __repr__(self):
    return f"LinenModel({type(self.module).__name__})"

  def __eq__(self, other):
    if type(other) is not type(self) or (other.method, other.takes_train, other.takes_mask) != (
        self.method, self.takes_train, self.takes_mask):
      return False
    if other.module is self.module:
      return True
    try:  # dataclass equality compares fields, lists included
      return type(other.module) is type(self.module) and bool(other.module == self.module)
    except Exception:  # noqa: BLE001 - fields that do not compare (arrays)
      return False

  def __hash__(self):
    # Not the module's hash (unhashable fields such as lists fail it): equal
    # modules of one class share a bucket and __eq__ tells them apart.
    return hash((type(self), type(self.module), self.method, self.takes_train,
                 self.takes_mask))

  def _raw(self, variables, inputs, *, train, rngs, mask, mutable, capture, keys):
    kwargs = {"train": train} if self.takes_train else {}
    if mask is not None and self.takes_mask:
      kwargs["mask"] = mask
    for arg, stream in self._key_args.items():
      kwargs[arg] = keys[stream]
    if capture:
      kwargs["capture_intermediates"] = True
    if self.method is not None:
      kwargs["method"] = self.method
    call = functools.partial(self.module.apply, variables, inputs, rngs=rngs or None,
                             mutable=list(mutable) if mutable else False, **kwargs)
    out = call_binding_axes(call, self._axes)
    return out if mutable else (out, {})

  def discover(self, variables, inputs, *, train: bool) -> tuple[str, ...]:
    """The RNG streams a pass asks for, found by tracing it abstractly
    (cached per mode and shapes)."""
    shapes = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), (variables, inputs))
    cache_key = (train, jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes)))
    if cache_key in self._found:
      return self._found[cache_key]
    from flax import errors

    streams = dict.fromkeys(self._key_args.values())
    dummy = jax.random.key(0)
    for _ in range(MAX_DISCOVERY):
      keys = {s: dummy for s in streams}
      try:
        jax.eval_shape(lambda v, x, k=keys: self._raw(
            v, x, train=train, rngs=k, mask=None, mutable=STATE_COLLECTIONS if train else (),
            capture=False, keys=k), variables, inputs)
        break
      except errors.InvalidRngError as e:
        name = re.search(r'needs PRNG for "([^"]+)"', str(e))
        if name is None or name.group(1) in streams:
          raise
        streams[name.group(1)] = None
    found = tuple(streams)
    self._found[cache_key] = found
    return found

  def init(self, key, inputs):
    return _init_fn(self)(key, inputs)

  def _init_kwargs(self, key):
    kwargs = {"train": False} if self.takes_train else {}
    kwargs.update({arg: key for arg in self._key_args})
    if self.method is not None:
      kwargs["method"] = self.method
    return kwargs

  def rngs(self, key, variables, inputs, *, train):
    streams = self.discover(variables, inputs, train=train)
    base = eval_key() if key is None else key
    found = {s: stream_key(base, s) for s in streams}
    if key is not None:
      found["dropout"] = key
    return found

  def apply(self, variables, inputs, *, train, rngs=None, mask=None, mutable=(),
            capture_intermediates=False, dropout=False):
    keys = dict(rngs or {})
    base = eval_key() if not keys else keys.get("dropout", next(iter(keys.values())))
    for stream in self._key_args.values():
      keys.setdefault(stream, stream_key(base, stream))
    if capture_intermediates:
      mutable = tuple(dict.fromkeys((*mutable, "intermediates")))
    run = functools.partial(self._raw, variables, inputs, train=train, rngs=rngs, mask=mask,
                            mutable=mutable, capture=capture_intermediates, keys=keys)
    if not dropout:
      return run()
    with nn.intercept_methods(dropout_on):
      return run()


@functools.lru_cache(maxsize=64)
def _init_fn(model: LinenModel):
  # One compiled init per model (equal modules share it), so states for many
  # seeds do not recompile. train=False: no dropout key, batch norm idle.
  def init(key, x):
    call = functools.partial(model.module.init, {"params": key}, x,
                             **model._init_kwargs(key))
    return call_binding_axes(call, model._axes)
  return jax.jit(init)


