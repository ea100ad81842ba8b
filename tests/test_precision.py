"""Mixed precision: bf16/fp16 compute over float32 master weights, float16's
dynamic loss scale, and why Adam's eps matters in float16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain import losses, models
from jaxtrain.core.precision import LossScale
from tests.helpers import classification_batch, tree_equal


def state_in(precision, optimizer=("adam", 0.01), **kwargs):
  model = models.CNN(features=(4,), dense=8, outputs=3, dropout_rate=0.0)
  return jaxtrain.create_train_state(model, jaxtrain.make_optimizer(*optimizer, **kwargs),
                                     jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                     loss_fn=losses.cross_entropy, precision=precision)


def image_batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
          "targets": rng.integers(0, 3, size=(n,)).astype(np.int32)}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_master_weights_optimizer_state_and_statistics_stay_float32(precision):
  state = state_in(precision)
  step = jax.jit(jaxtrain.train_step)
  fp32, _ = step(state_in("fp32"), image_batch(), jax.random.key(1))
  for k in range(3):
    state, metrics = step(state, image_batch(seed=k), jax.random.key(k))
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  # The model did compute in the low dtype: the first step's loss differs from
  # float32's, a little.
  low, _ = step(state_in(precision), image_batch(), jax.random.key(1))
  first_fp32 = jaxtrain.eval_step(fp32, image_batch())["loss"]
  first_low = jaxtrain.eval_step(low.replace(precision="fp32"), image_batch())["loss"]
  assert first_low != first_fp32 and abs(first_low - first_fp32) < 0.05


def test_the_loss_scale_halves_on_overflow_and_grows_back():
  state = state_in("fp16")
  assert float(state.loss_scale.scale) == 2.0 ** 16  # torch.amp.GradScaler's default
  # A scale no float16 gradient survives: the update is skipped, the scale halves.
  state = state.replace(loss_scale=LossScale.create(init_scale=2.0 ** 100, growth_interval=2))
  step = jax.jit(jaxtrain.train_step)
  skipped, metrics = step(state, image_batch(), jax.random.key(1))
  assert not np.isfinite(float(metrics["grad_norm"]))
  assert tree_equal(skipped.params, state.params) and tree_equal(skipped.opt_state,
                                                                 state.opt_state)
  assert float(skipped.loss_scale.scale) == 2.0 ** 99 and int(skipped.step) == 1
  # A scale that fits: two finite steps in a row double it.
  fits = state.replace(loss_scale=LossScale.create(init_scale=256.0, growth_interval=2))
  scales = []
  for k in range(4):
    fits, metrics = step(fits, image_batch(seed=k), jax.random.key(k))
    assert np.isfinite(float(metrics["grad_norm"]))
    scales.append(float(fits.loss_scale.scale))
  assert scales == [256.0, 512.0, 512.0, 1024.0]
  assert not tree_equal(fits.params, state.params)


def test_fit_with_fp16_logs_the_scale_and_skips_overflow_without_stopping():
  state = state_in("fp16").replace(loss_scale=LossScale.create(2.0 ** 40, growth_interval=3))
  batch = image_batch(n=64)
  result = jaxtrain.fit(state, batch, config=jaxtrain.FitConfig(epochs=3, batch_size=8),
                        val=batch)
  scales = result.history["step"]["loss_scale"]
  assert scales[0] == 2.0 ** 40 and scales[1] == 2.0 ** 39  # overflowed: halved
  assert result.stop_reason is None and len(scales) == 24  # skipped, not stopped
  kept = [i for i in range(23) if scales[i + 1] >= scales[i]]
  assert kept, scales  # the scale came down to one whose gradients are finite
  assert not tree_equal(result.state.params, state.params)


def test_adam_eps_matters_in_float16_as_the_lesson_says():
  # Whole-fp16 Adam: the gradient 1e-4 squares to 1e-8, below float16's
  # smallest subnormal (6e-8), so v underflows to 0 and the step is lr * m / eps:
  # with eps 1e-8, 10 (ten thousand times the learning rate); a larger eps
  # gives a step of the learning rate's size.
  grads = {"w": jnp.full((4,), 1e-4, jnp.float16)}
  params = {"w": jnp.ones((4,), jnp.float16)}

  def adam_step(eps, dtype=jnp.float16):
    tx = jaxtrain.make_optimizer("adam", 1e-3, eps=eps)
    g, p = jax.tree.map(lambda x: x.astype(dtype), (grads, params))
    updates, _ = tx.update(g, tx.init(p), p)
    return np.abs(np.asarray(updates["w"], np.float32))

  assert float(jnp.square(grads["w"])[0]) == 0.0
  assert np.all(adam_step(1e-8) > 5.0)  # blown up
  assert np.all(adam_step(1e-4) < 2e-3)  # trains: a step of about lr
  # In float32 (jaxtrain's master weights and moments under --precision fp16)
  # eps 1e-8 is harmless: the step is the learning rate.
  np.testing.assert_allclose(adam_step(1e-8, jnp.float32), 1e-3, rtol=1e-3)
  # jaxtrain's fp16 keeps the master weights and Adam's moments in float32: eps
  # 1e-8 keeps its value there and the same step trains.
  state = state_in("fp16", ("adam", 1e-3), eps=1e-8)
  new, _ = jax.jit(jaxtrain.train_step)(state, image_batch(), jax.random.key(1))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new.params))
  assert not tree_equal(new.params, state.params)


def test_an_unknown_precision_is_refused_by_name():
  with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, fp16, got 'fp8'"):
    state_in("fp8")


def test_a_hand_cast_low_precision_state_is_warned_about():
  state = jaxtrain.create_train_state(
      models.MLP(hidden_sizes=(4,), outputs=3), jaxtrain.make_optimizer("sgd", 0.1),
      jax.random.key(0), jnp.zeros((1, 6)), loss_fn=losses.cross_entropy)
  state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), state.params))
  with pytest.warns(UserWarning, match="parameters in bfloat16.*precision='bf16'"):
    jaxtrain.fit(state, classification_batch(n=16),
                 config=jaxtrain.FitConfig(epochs=1, batch_size=8))
