"""Models and the CPU convolution: shapes, modes, and matmul conv == lax.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import conv, models


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3), (2, 28, 28)])
def test_cnn_shapes(shape):
  model = models.CNN(features=(8, 16), dense=32, outputs=10, dropout_rate=0.2)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), jnp.zeros(shape),
                                                          train=False)
  assert "batch_stats" in variables
  out, _ = jax.jit(model.apply, static_argnames=("train", "mutable"))(
      variables, jnp.ones(shape), train=True, mutable=("batch_stats",),
      rngs={"dropout": jax.random.key(1)})
  assert out.shape == (2, 10)


def test_pigeon_is_784_30_1():
  variables = models.Pigeon().init(jax.random.key(0), jnp.zeros((1, 28, 28)), train=False)
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes == {"Dense_0": {"kernel": (784, 30), "bias": (30,)},
                    "Dense_1": {"kernel": (30, 1), "bias": (1,)}}


@pytest.mark.parametrize("shape", [(3, 7, 6, 2), (2, 28, 28, 1)])
def test_matmul_conv_equals_lax_conv_with_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 5))
  np.testing.assert_allclose(conv.conv3x3_matmul(x, k), conv.conv3x3_xla(x, k), rtol=1e-4, atol=1e-4)
  g1 = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv.conv3x3_matmul(x, k))), (0, 1))(x, k)
  g2 = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv.conv3x3_xla(x, k))), (0, 1))(x, k)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_max_pool_impls_agree():
  x = jax.random.normal(jax.random.key(0), (2, 7, 8, 3))
  np.testing.assert_array_equal(conv.max_pool_2x2(x, impl="matmul"), conv.max_pool_2x2(x, impl="xla"))


def test_cnn_impls_share_parameters_and_numerics():
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  fast = models.CNN(features=(8, 16), dense=32, conv_impl="matmul")
  ref = fast.clone(conv_impl="xla")
  variables = fast.init(jax.random.key(1), x, train=False)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, ref.init(jax.random.key(1), x, train=False))
  np.testing.assert_allclose(fast.apply(variables, x, train=False),
                             ref.apply(variables, x, train=False), rtol=1e-4, atol=1e-4)
  assert conv.resolve_impl("auto") == "matmul"  # tests run on CPU


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="activation .* 'swish2'"):
    models.MLP(hidden_sizes=(4,), outputs=1, activation="swish2")
  with pytest.raises(ValueError, match="conv_impl .* 'cudnn'"):
    models.CNN(conv_impl="cudnn")
  with pytest.raises(ValueError, match="hidden_sizes=\\(0,\\)"):
    models.MLP(hidden_sizes=(0,), outputs=1)


def test_batch_norm_matches_torch():
  # Reference: torch 2.13.0, torch.nn.BatchNorm1d(4) in train mode on this x.
  x = (np.random.default_rng(0).normal(size=(6, 4)) * 3 + 1).astype(np.float32)
  bn = models.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y[0], [1.0328506, -0.12384936, 0.76058203, -0.31392786], rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"],
                             [-0.10557494, 0.08977201, 0.09108366, 0.18775314], rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"],  # unbiased, as torch
                             [1.5658374, 1.5763785, 1.7384303, 1.2857236], rtol=1e-5)


def test_batch_norm_mask_drops_rows_from_statistics():
  x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  bn = models.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  padded = np.concatenate([x, 1e6 * np.ones((2, 3), np.float32)])
  mask = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
  y, upd = bn.apply(variables, padded, train=True, mask=mask, mutable=["batch_stats"])
  y_ref, upd_ref = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y[:5], y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], upd_ref["batch_stats"]["var"], rtol=1e-6)
