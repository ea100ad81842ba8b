"""jaxtrain.summary: parameter counts by hand, FLOPs against the matmuls'
hand count (XLA also counts the elementwise work: a few percent more)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxtrain
from tests import published


def adam_state(model, shape):
  return jaxtrain.create_train_state(model, jaxtrain.make_optimizer("adam", 1e-3),
                                     jax.random.key(0), jnp.zeros((1, *shape)),
                                     loss_fn=jaxtrain.losses.cross_entropy)


def test_an_mlp_is_counted_by_hand():
  state = adam_state(jaxtrain.models.MLP(hidden_sizes=(1024, 1024), outputs=10), (784,))
  batch = 128
  s = jaxtrain.summary(state, jnp.zeros((batch, 784)), jnp.zeros((batch,), jnp.int32))
  sizes = [(784, 1024), (1024, 1024), (1024, 10)]
  assert [(m.path, m.params, m.count) for m in s.modules] == [
      (f"Dense_{i}", {"bias": (o,), "kernel": (i_, o)}, i_ * o + o)
      for i, (i_, o) in enumerate(sizes)]
  assert s.params == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10 == 1_863_690
  assert s.param_bytes == 4 * s.params and s.batch_stats == 0
  assert 2 * s.param_bytes <= s.optimizer_bytes <= 2 * s.param_bytes + 64  # Adam's moments
  matmuls = sum(2 * batch * i * o for i, o in sizes)
  assert matmuls <= s.forward_flops <= 1.01 * matmuls
  # Backward: weight gradients for every layer, input gradients but for the first.
  step = 3 * matmuls - 2 * batch * 784 * 1024
  assert step <= s.step_flops <= 1.05 * step
  assert s.batch_size == batch and "3 modules" in str(s) and "1,863,690" in str(s)


def test_the_cnn_linen_and_the_tutorial_cnn_nnx_are_counted_by_hand():
  batch = 32
  inputs, targets = jnp.zeros((batch, 28, 28, 1)), jnp.zeros((batch,), jnp.int32)
  linen = jaxtrain.summary(adam_state(jaxtrain.models.CNN(), (28, 28, 1)), inputs, targets)
  tutorial = jaxtrain.summary(adam_state(published.CNN(rngs=nnx.Rngs(0)), (28, 28, 1)),
                              inputs, targets)
  # models.CNN: 3x3 convs 1->32->64 without bias (batch norm follows), dense 3136->128->10.
  assert {m.path: m.count for m in linen.modules} == {
      "Conv3x3_0": 9 * 32, "Conv3x3_1": 9 * 32 * 64, "BatchNorm_0": 64, "BatchNorm_1": 128,
      "Dense_0": 3136 * 128 + 128, "Dense_1": 128 * 10 + 10}
  # The NNX tutorial's CNN: the same with biases, 256 hidden units.
  assert {m.path: m.count for m in tutorial.modules} == {
      "conv1": 9 * 32 + 32, "conv2": 9 * 32 * 64 + 64, "batch_norm1": 64, "batch_norm2": 128,
      "linear1": 3136 * 256 + 256, "linear2": 256 * 10 + 10}
  for s in (linen, tutorial):
    assert s.batch_stats == 2 * (32 + 64)  # running mean and variance
    assert {m.path: m.batch_stats for m in s.modules if m.batch_stats} == {
        p: 2 * n for p, n in (("BatchNorm_0", 32), ("BatchNorm_1", 64), ("batch_norm1", 32),
                              ("batch_norm2", 64)) if p in {m.path for m in s.modules}}
  # 3x3 SAME convolutions on n x n: 9 n^2 taps as matmuls (jaxtrain's Conv3x3 on
  # CPU), (3n - 2)^2 without the zero padding (XLA's count for lax.conv).
  for s, hidden, taps in ((linen, 128, lambda n: 9 * n * n),
                          (tutorial, 256, lambda n: (3 * n - 2) ** 2)):
    macs = taps(28) * 32 + taps(14) * 32 * 64 + 3136 * hidden + hidden * 10
    assert 2 * batch * macs <= s.forward_flops <= 1.05 * 2 * batch * macs


def test_without_targets_no_step_flops_and_a_bad_batch_size_is_refused():
  state = adam_state(jaxtrain.models.MLP(hidden_sizes=(8,), outputs=3), (4,))
  s = jaxtrain.summary(state, jnp.zeros((2, 4)), batch_size=64)
  assert s.params == 4 * 8 + 8 + 8 * 3 + 3 and s.step_flops is None and s.batch_size == 64
  assert 2 * 64 * (4 * 8 + 8 * 3) <= s.forward_flops <= 1.2 * 2 * 64 * (4 * 8 + 8 * 3)
  assert "training step" not in str(s) and "FLOPs per batch of 64: forward" in str(s)
  with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
    jaxtrain.summary(state, jnp.zeros((2, 4)), batch_size=0)


def test_inputs_as_a_dict_are_refused_in_one_line_naming_them():
  with pytest.raises(ValueError, match="example_inputs must be one array .* got a dict"):
    jaxtrain.create_train_state(jaxtrain.models.MLP(hidden_sizes=(8,), outputs=3),
                                jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0),
                                {"a": jnp.zeros((1, 4))}, loss_fn=jaxtrain.losses.mse)
