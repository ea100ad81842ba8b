"""Strided and 1x1 convolutions as slices and one matmul
(``jaxtrain.nn.conv.conv_matmul``): the values and gradients of
``lax.conv_general_dilated`` over strides, kernel sizes, paddings and odd and
even inputs, and plain ``nn.Conv`` / ``nnx.Conv`` layers routed to them within
``flax_convs`` (dilated ones left to ``lax``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.nn.conv import conv_matmul, flax_convs, swap_nnx_convs

DIMS = ("NHWC", "HWIO", "NHWC")
KERNELS = (1, 3, 5, 7)
PADDINGS = ("SAME", "VALID", ((1, 2), (0, 1)))
# Every kernel size and padding with strides (2, 2) and (1, 2); stride 1 (also
# in tests/test_flax_convs.py) with one padding per kernel size.
CASES = ([(k, s, p) for k in KERNELS for s in ((2, 2), (1, 2)) for p in PADDINGS]
         + [(k, (1, 1), PADDINGS[i % 3]) for i, k in enumerate(KERNELS)])


def lax_conv(x, kernel, padding, strides):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMS)


def shapes_for(size):
  """Odd and even inputs: 3 -> 5 channels on 9x8, 8 -> 16 on 10x7."""
  if size in (1, 5):
    return (2, 9, 8, 3), (size, size, 3, 5)
  return (2, 10, 7, 8), (size, size, 8, 16)


def normal(shape):
  """Float32 normal samples (numpy: no compilation per shape)."""
  return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def outputs_and_grads(conv, x, kernel, padding, strides):
  """The convolution and its gradients w.r.t. input and kernel (one vjp)."""
  y, pullback = jax.vjp(lambda x, k: conv(x, k, padding, strides), x, kernel)
  dy = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
  return (y, *pullback(dy))


def assert_close(fast, reference):
  for a, b in zip(fast, reference):
    assert a.shape == b.shape
    # float32 rounding of sums of up to 7*7*8 products, relative to their scale
    a, b = np.asarray(a), np.asarray(b)  # numpy: no compilation per shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("size,strides,padding", CASES)
def test_conv_matmul_equals_lax_with_gradients(size, strides, padding):
  x, kernel = map(normal, shapes_for(size))

  @jax.jit  # one compilation per case: both paths in one program
  def both(x, kernel):
    return (outputs_and_grads(conv_matmul, x, kernel, padding, strides),
            outputs_and_grads(lax_conv, x, kernel, padding, strides))

  fast, reference = both(x, kernel)
  assert_close(fast, reference)


def test_1x1_any_stride_is_one_matmul_without_concatenation():
  x, kernel = normal((2, 10, 7, 8)), normal((1, 1, 8, 16))
  fast = jax.jit(lambda x, k: outputs_and_grads(conv_matmul, x, k, "SAME", (3, 2)))
  assert_close(fast(x, kernel), outputs_and_grads(lax_conv, x, kernel, "SAME", (3, 2)))
  jaxpr = str(jax.make_jaxpr(lambda x, k: conv_matmul(x, k, "SAME", (3, 2)))(x, kernel))
  assert "concatenate" not in jaxpr and "conv_general_dilated" not in jaxpr


def flax_both(conv, x):
  """``conv``'s output and parameter gradients without and within
  ``flax_convs("matmul")``, and the jaxpr traced within."""
  variables = jax.jit(conv.init)(jax.random.key(0), x)

  def outputs():  # a new function each time: jit caches its traces per function
    def loss(variables, x):
      return jnp.sum(jnp.sin(conv.apply(variables, x)))
    return lambda variables, x: (conv.apply(variables, x), jax.grad(loss)(variables, x))

  reference = jax.jit(outputs())(variables, x)
  with flax_convs("matmul"):
    fast = outputs()
    jaxpr = str(jax.make_jaxpr(fast)(variables, x))
    fast = jax.jit(fast)(variables, x)
  return jax.tree.leaves(fast), jax.tree.leaves(reference), jaxpr


@pytest.mark.parametrize("size,strides,padding", [
    (3, 2, "SAME"), (1, 2, "SAME"), (7, 2, ((3, 3), (3, 3))), (3, (1, 2), "VALID"),
    (5, 2, ((1, 2), (0, 1)))])
def test_nn_conv_within_flax_convs_runs_no_lax_conv(size, strides, padding):
  conv = nn.Conv(6, (size, size), strides=strides, padding=padding)
  fast, reference, jaxpr = flax_both(conv, normal((2, 9, 8, 3)))
  assert "conv_general_dilated" not in jaxpr
  assert_close(fast, reference)


def test_dilated_nn_conv_is_left_to_lax():
  conv = nn.Conv(6, (3, 3), strides=2, kernel_dilation=2)
  fast, reference, jaxpr = flax_both(conv, normal((2, 9, 8, 3)))
  assert "conv_general_dilated" in jaxpr
  for a, b in zip(fast, reference):
    np.testing.assert_array_equal(a, b)


def test_strided_nnx_conv_swapped_within_flax_convs():
  x = normal((2, 9, 8, 3))
  conv = nnx.Conv(3, 6, (3, 3), strides=2, rngs=nnx.Rngs(0))
  reference = conv(x)
  with flax_convs("matmul"):
    swap_nnx_convs(conv)
  assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x: conv(x))(x))
  assert_close([conv(x)], [reference])


class _Compiles:
  """Counts XLA compilations (JAX's backend_compile event, once per executable)."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    self.count += event == "/jax/core/compile/backend_compile_duration"

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_fit_on_a_resnet18_is_the_same_with_matmul_and_xla_convs_and_compiles_once():
  """flax's ResNet-18 as published (7x7 stride-2 stem, stride-2 3x3 and 1x1
  projections): conv_impl="auto" (matmuls, scanned) and "xla" (lax.conv, one
  step per call) train to the same numbers; a second fit compiles nothing."""
  import optax

  import jaxtrain
  from jaxtrain import losses
  from tests import published

  rng = np.random.default_rng(0)
  data = {"inputs": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
          "targets": rng.integers(0, 4, size=(32,)).astype(np.int32)}
  template = jaxtrain.create_train_state(
      published.ResNet18(num_classes=4, num_filters=8), optax.sgd(0.05, momentum=0.9),
      jax.random.key(0), data["inputs"][:1], loss_fn=losses.cross_entropy)

  def fit(impl):
    state = jax.tree.map(lambda a: jnp.array(a, copy=True), template)
    config = jaxtrain.FitConfig(epochs=1, batch_size=16, progress=False, histogram_every=0,
                                evaluate_train=False, conv_impl=impl)
    return jaxtrain.fit(state, data, config=config, log=lambda _: None)

  fast, slow = fit("auto"), fit("xla")
  np.testing.assert_allclose(fast.history["step"]["loss"], slow.history["step"]["loss"],
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fast.state.params), jax.tree.leaves(slow.state.params),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  with _Compiles() as compiles:
    again = fit("auto")
  assert compiles.count == 0
  assert np.array_equal(again.history["step"]["loss"], fast.history["step"]["loss"])
