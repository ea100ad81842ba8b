"""Random bits drawn once per use in fit's CPU programs: the same bits as JAX's."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtrain
from jaxtrain import losses, models
from jaxtrain.engine import programs
from jaxtrain.nn import cpu_random
from tests.helpers import moons_split, tree_equal

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU lowering")


def _draws(fast: bool, fn, *args):
  """``fn(*args)`` jitted and lowered inside or outside the context (a new jit
  each time: jit caches the lowering of a function it has seen)."""
  with cpu_random.fast_random_bits(fast):
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
  return compiled(*args), compiled.as_text()


@pytest.mark.parametrize("shape", [(2048,), (32, 28, 28, 4), (33, 77), (5, 1, 513)])
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32])
def test_bits_are_jaxs_bits(shape, dtype):
  keys = [jax.random.key(seed) for seed in (0, 7, 2**31 + 5)]
  draw = lambda *keys: [jax.random.bits(k, shape, dtype) for k in keys]  # noqa: E731
  (ours, text), (jaxs, _) = (_draws(fast, draw, *keys) for fast in (True, False))
  assert ours[0].dtype == jaxs[0].dtype == dtype and tree_equal(ours, jaxs)
  assert text.count(" conditional(") == 3  # each draw wrapped (>= 1024 bits)


def test_distributions_keys_folded_in_and_vmapped_keys_are_jaxs():
  key = jax.random.key(3)

  def draws(k):
    k = jax.random.fold_in(k, 11)
    keys = jax.random.split(k, 4)
    return (jax.random.bernoulli(k, 0.9, (64, 33)), jax.random.uniform(k, (3000,)),
            jax.random.normal(k, (40, 40)), jax.vmap(lambda k: jax.random.bits(k, (2000,)))(keys),
            jax.random.bits(k, (3,)))  # small: JAX's own lowering
  assert tree_equal(_draws(True, draws, key)[0], _draws(False, draws, key)[0])


def test_a_dropout_mask_is_drawn_once_in_one_pass():
  shape = (16, 28, 28, 8)
  x = jax.random.normal(jax.random.key(1), shape)

  def grad(x, key):  # the mask is used forward and twice backward
    def loss(x):
      y = jnp.where(jax.random.bernoulli(key, 0.9, shape), x / 0.9, 0)
      return jnp.sum(jnp.tanh(y) * x)
    return jax.grad(loss)(x)
  (ours, text), (jaxs, _) = (_draws(f, grad, x, jax.random.key(2)) for f in (True, False))
  assert np.array_equal(ours, jaxs)
  assert text.count(" conditional(") == 1  # drawn once, its result kept
  assert " while(" not in text  # threefry's rounds unrolled (JAX's CPU rule loops)


def test_two_draws_of_one_shape_are_each_drawn_once():
  """A module's lowering cache keys a draw by its shape: the second draw must
  get the wrapped lowering too, not the one made inside the first's wrapper."""
  def draws(k):
    a, b = jax.random.split(k)
    return jax.random.bits(a, (64, 64)), jax.random.bits(b, (64, 64))
  (ours, text), (jaxs, _) = (_draws(fast, draws, jax.random.key(5)) for fast in (True, False))
  assert tree_equal(ours, jaxs)
  assert text.count(" conditional(") == 2


def test_outside_the_context_nothing_changes():
  _draws(True, lambda k: jax.random.bits(k, (4096,)), jax.random.key(0))  # installed
  assert cpu_random._ORIGINAL and "failed" not in cpu_random._ORIGINAL  # noqa: SLF001
  text = _draws(False, lambda k: jax.random.bits(k, (4096,)), jax.random.key(0))[1]
  assert " conditional(" not in text  # the rules deferred to JAX's


class _Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(2, 64, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear2 = nnx.Linear(64, 2, rngs=rngs)

  def __call__(self, x):
    return self.linear2(self.dropout(nnx.relu(self.linear1(x))))


@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_fit_draws_this_way_and_trains_to_the_same_bits(model, monkeypatch):
  train, _ = moons_split()
  config = jaxtrain.FitConfig(epochs=2, batch_size=32, progress=False, histogram_every=0)

  def fit():
    module = (models.MLP(hidden_sizes=(64,), outputs=2, dropout_rate=0.3) if model == "linen"
              else _Net(nnx.Rngs(0)))
    state = jaxtrain.create_train_state(module, jaxtrain.make_optimizer("sgd", 0.1),
                                        jax.random.key(0), train["inputs"][:1],
                                        loss_fn=losses.cross_entropy)
    programs._compiled.cache_clear()  # noqa: SLF001 (lower the programs again)
    return jaxtrain.fit(state, train, config=config, log=lambda _: None)

  wrapped = []
  cond = jax.lax.cond

  def spy(pred, true_fun, false_fun, *operands, **kw):
    wrapped.append(true_fun is false_fun)
    return cond(pred, true_fun, false_fun, *operands, **kw)
  monkeypatch.setattr(jax.lax, "cond", spy)
  fast = fit()
  assert any(wrapped), "fit's programs did not draw through fast_random_bits"
  wrapped.clear()
  monkeypatch.setattr(programs, "fast_random_bits", contextlib.nullcontext)
  plain = fit()
  assert not any(wrapped)
  assert tree_equal(fast.state.params, plain.state.params)
  assert fast.history["step"]["loss"] == plain.history["step"]["loss"]
