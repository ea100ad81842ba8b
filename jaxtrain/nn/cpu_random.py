"""Random bits drawn once, in one pass, inside jaxtrain's programs on CPU.

A dropout layer draws a mask of the activation's shape from ``jax.random``'s
threefry generator. On the CPU backend JAX lowers threefry's 20 rounds as a
rolled loop of 5 iterations (to keep compiles short), so every round reads and
writes the whole array; unrolled, the rounds are one fused pass, ~2.5x faster
(800k bits: 0.50 vs 1.25 ms here). Unrolled, though, XLA fuses the draw into
each of its consumers (the forward pass and the backward pass's two uses of the
mask) and draws it three times. :func:`fast_random_bits` lowers both primitives
so that a mask is drawn once, unrolled, inside a ``lax.cond`` (XLA materialises
a conditional's result rather than fusing it into each consumer; both branches
are the same draw). On the tutorial CNN's training step that is 9% faster
(6.4 vs 7.0 ms, BENCHMARKS.md "Flax NNX").

The bits are the same: only how XLA computes them changes (the algorithm, keys
and counters are JAX's; tests/test_cpu_random.py compares them). ``fit`` runs
its programs inside the context; other code, and other backends, keep JAX's
lowering. If a JAX version lacks what this needs, the context changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import jax
import jax.numpy as jnp
import numpy as np

# "on": draws are wrapped and unrolled; "branch": inside the wrapped draw (the
# draw's own random_bits lowers as JAX does, its threefry unrolled).
_MODE = contextvars.ContextVar("jaxtrain_fast_random_bits", default="off")
_ORIGINAL: dict = {}  # primitive -> JAX's own CPU lowering rule
_LOCK = threading.Lock()


def _rotate_left(v, r: int):
  return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(key1, key2, x1, x2):
  """Threefry-2x32 (20 rounds, unrolled) on uint32 arrays: the same function
  as ``jax.extend.core.primitives.threefry2x32_p``, written as plain ``jnp``
  operations so that XLA fuses all 20 rounds into one pass.

  >>> k1, k2 = jnp.uint32(0), jnp.uint32(42)
  >>> x1, x2 = jnp.arange(4, dtype=jnp.uint32), jnp.arange(4, 8, dtype=jnp.uint32)
  >>> from jax.extend.core.primitives import threefry2x32_p
  >>> ours, jaxs = threefry2x32(k1, k2, x1, x2), threefry2x32_p.bind(k1, k2, x1, x2)
  >>> all(bool((a == b).all()) for a, b in zip(ours, jaxs))
  True
  """
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in rotations[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ _rotate_left(x[1], r)
    x[0] = x[0] + ks[(i + 1) % 3]
    x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x[0], x[1]


def _threefry_rule(ctx, *args, **params):
  if _MODE.get() == "off":
    return _ORIGINAL["threefry2x32"](ctx, *args, **params)
  from jax.interpreters import mlir

  return mlir.lower_fun(threefry2x32, multiple_results=True)(ctx, *args)


def _random_bits_rule(ctx, keys, *, bit_width, shape):
  aval, = ctx.avals_in
  if (_MODE.get() != "on" or aval.ndim or str(aval.dtype) != "key<fry>"
      or not shape or int(np.prod(shape)) < 1024):
    return _ORIGINAL["random_bits"](ctx, keys, bit_width=bit_width, shape=shape)
  from jax.interpreters import mlir

  dtype = jnp.dtype(f"uint{bit_width}")

  def draw(key):
    return jax.random.bits(key, shape, dtype)

  def wrapped(key):
    data = jax.random.key_data(key)
    # Any runtime predicate: both branches are the same draw.
    return jax.lax.cond(data[0] != data[-1], draw, draw, key)

  token = _MODE.set("branch")  # the draw inside lowers as JAX's, unrolled
  try:
    return mlir.lower_fun(wrapped, multiple_results=False)(ctx, keys)
  finally:
    _MODE.reset(token)


def _install() -> bool:
  """Registers the two CPU rules once (they defer to JAX's own rules outside
  the context); False where this JAX lacks what they need."""
  with _LOCK:  # two threads must not take each other's rules for JAX's
    if not _ORIGINAL:
      _ORIGINAL.update(_register() or {"failed": None})
    return "failed" not in _ORIGINAL


def _register() -> dict | None:
  try:
    from jax.extend.core.primitives import random_bits_p, threefry2x32_p
    from jax.interpreters import mlir

    def rule(primitive):
      # JAX keeps (rule, inline) entries: the CPU one, else the common one.
      entry = (mlir._platform_specific_lowerings["cpu"].get(primitive)  # noqa: SLF001
               or mlir._lowerings[primitive])  # noqa: SLF001
      return getattr(entry, "rule", entry)

    originals = {"threefry2x32": rule(threefry2x32_p), "random_bits": rule(random_bits_p)}
    if any(r in (_threefry_rule, _random_bits_rule) for r in originals.values()):
      return None  # ours already (a reloaded module): nothing to defer to
    _ORIGINAL.update(originals)  # the rules read them from their first lowering
    # Cacheable as JAX's: a module's lowering cache keys a draw by its shape; the
    # draw lowered inside the wrapper is cached first, then the wrapped one
    # replaces it, which is what the next draw of that shape in the module gets.
    mlir.register_lowering(threefry2x32_p, _threefry_rule, platform="cpu")
    mlir.register_lowering(random_bits_p, _random_bits_rule, platform="cpu")
  except (ImportError, AttributeError, KeyError, TypeError, NotImplementedError):
    return None
  return originals


@contextlib.contextmanager
def fast_random_bits(enabled: bool = True):
  """Within this context, programs compiled for the CPU draw their random bits
  (dropout masks, noise) once per use, in one unrolled pass: the same bits as
  JAX's own lowering, faster. A jitted function is lowered at its first call, so
  call it (or ``.lower`` it) inside.

  >>> key = jax.random.key(0)
  >>> draw = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 64)))
  >>> with fast_random_bits():
  ...   fast = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 64)))(key)
  >>> bool((fast == draw(key)).all())
  True
  """
  if not enabled or jax.default_backend() != "cpu" or not _install():
    yield  # other backends keep JAX's lowering, untouched
    return
  token = _MODE.set("on")
  try:
    yield
  finally:
    _MODE.reset(token)
