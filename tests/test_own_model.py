"""A researcher's own Flax model, as pasted from the Flax docs: no ``train`` or
``mask`` keyword, a plain optax optimizer (README "Your own model")."""

import warnings

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxtrain


class FlaxExampleCNN(nn.Module):
  """A simple CNN model (flax examples/mnist/train.py, unchanged)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


class PlainBatchNormMLP(nn.Module):
  """Batch norm as the Flax docs write it: ``train``, but no ``mask``."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(2)(nn.relu(x))


def _moons(n=100):
  x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
  return {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}


def test_the_flax_example_cnn_trains_unchanged_through_fit(mnist_path):
  parts = jaxtrain.data.load_mnist(mnist_path, splits=("train",))["train"]
  train = {"inputs": jaxtrain.data.normalize_images(parts["inputs"][:1024]),
           "targets": parts["targets"][:1024]}
  val = {"inputs": jaxtrain.data.normalize_images(parts["inputs"][1024:1536]),
         "targets": parts["targets"][1024:1536]}
  state = jaxtrain.create_train_state(FlaxExampleCNN(), optax.sgd(0.05, momentum=0.9),
                                      jax.random.key(0), train["inputs"][:1],
                                      loss_fn=jaxtrain.losses.cross_entropy)
  assert state.takes_train is False and state.takes_mask is False
  result = jaxtrain.fit(state, train, val=val, log=lambda _: None,
                        config=jaxtrain.FitConfig(epochs=2, batch_size=32, progress=False,
                                                  histogram_every=0))
  accuracy = result.history["epoch"]["val_accuracy"]
  assert accuracy[-1] > 0.8, accuracy  # chance is 0.1
  # Plain optax injects no learning rate: the column is NaN, not an error.
  assert np.isnan(result.history["epoch"]["learning_rate"]).all()


def test_a_model_without_mask_warns_once_about_padded_batch_norm():
  state = jaxtrain.create_train_state(PlainBatchNormMLP(), optax.sgd(0.1), jax.random.key(0),
                                      np.zeros((1, 2), np.float32),
                                      loss_fn=jaxtrain.losses.cross_entropy)
  config = jaxtrain.FitConfig(epochs=2, batch_size=32, progress=False, histogram_every=0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jaxtrain.fit(state, _moons(100), config=config, log=lambda _: None)  # 100 = 3*32 + 4
  messages = [str(w.message) for w in caught if "mask=" in str(w.message)]
  assert len(messages) == 1 and "BatchNorm_0" in messages[0] and "28 padding rows" in messages[0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jaxtrain.fit(state, _moons(96), config=config, log=lambda _: None)  # no ragged batch
  assert not [w for w in caught if "mask=" in str(w.message)]


@pytest.mark.parametrize("model", [jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2,
                                                        batch_norm=True)])
def test_our_models_take_train_and_mask_and_do_not_warn(model):
  state = jaxtrain.create_train_state(model, jaxtrain.make_optimizer("sgd", 0.1),
                                      jax.random.key(0), np.zeros((1, 2), np.float32),
                                      loss_fn=jaxtrain.losses.cross_entropy)
  assert state.takes_train and state.takes_mask
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jaxtrain.fit(state, _moons(100), log=lambda _: None,
                 config=jaxtrain.FitConfig(epochs=1, batch_size=32, progress=False,
                                           histogram_every=0))
  assert not [w for w in caught if "mask=" in str(w.message)]
