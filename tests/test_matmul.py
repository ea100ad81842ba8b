"""jaxtrain.matmul: the CPU weight-gradient layout gives XLA's values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import matmul as mm


def _loss(impl):
  # sin makes the cotangent depend on every output, so a wrong transpose shows.
  return lambda x, w: jnp.sum(jnp.sin(mm.matmul(x, w, impl=impl)))


@pytest.mark.parametrize("x_shape, w_shape", [
    ((5, 3), (3, 4)),            # dense
    ((2, 6, 5, 9), (9, 7)),      # conv patches [batch, H, W, 9 * channels]
    ((128, 9), (9, 32)),         # a first conv layer's K = 9
])
def test_cpu_impl_equals_jnp_matmul_with_gradients(x_shape, w_shape):
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  np.testing.assert_array_equal(mm.matmul(x, w, impl="cpu"), mm.matmul(x, w, impl="xla"))
  got = jax.jit(jax.grad(_loss("cpu"), (0, 1)))(x, w)
  want = jax.jit(jax.grad(_loss("xla"), (0, 1)))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_cpu_impl_under_vmap_equals_per_member():
  # fit_many vmaps the program over members: each member's gradient is its own.
  kx, kw = jax.random.split(jax.random.key(1))
  xs, ws = jax.random.normal(kx, (4, 8, 3)), jax.random.normal(kw, (4, 3, 2))
  grads = jax.vmap(jax.grad(_loss("cpu"), 1))(xs, ws)
  for i in range(4):
    np.testing.assert_allclose(grads[i], jax.grad(_loss("xla"), 1)(xs[i], ws[i]),
                               rtol=1e-5, atol=1e-6)


def test_auto_is_cpu_on_the_cpu_backend():
  assert mm.resolve_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")


def test_bad_input_names_the_value():
  with pytest.raises(ValueError, match="'fast'"):
    mm.matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), impl="fast")
  with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\)"):
    mm.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"\(3, 4, 1\)"):
    mm.matmul(jnp.ones((2, 3)), jnp.ones((3, 4, 1)))
