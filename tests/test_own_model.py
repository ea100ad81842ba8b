"""A researcher's own Flax model, as pasted from the Flax docs: no ``train`` or
``mask`` keyword, a plain optax optimizer (docs/guides/own-model.md)."""

import warnings

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxtrain
from benchmarks.baselines import FlaxExampleCNN  # flax examples/mnist, as published
from jaxtrain.train.execution import choose_execution


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
  """The Flax MNIST example's model and optimizer (SGD 0.1, momentum 0.9, batch
  128) as published, on the 6000 local training images: 3 of its 10 epochs
  reach 96.4% on the 10,000 test images (the 10 took 50 s of the suite)."""
  data = jaxtrain.data.load_mnist(mnist_path, splits=("train", "test"))
  train, test = ({"inputs": jaxtrain.data.normalize_images(d["inputs"]),
                  "targets": d["targets"]} for d in (data["train"], data["test"]))
  state = jaxtrain.create_train_state(FlaxExampleCNN(), optax.sgd(0.1, momentum=0.9),
                                      jax.random.key(0), train["inputs"][:1],
                                      loss_fn=jaxtrain.losses.cross_entropy)
  assert state.takes_train is False and state.takes_mask is False
  # The example drops each epoch's incomplete last batch.
  config = jaxtrain.FitConfig(epochs=3, batch_size=128, drop_remainder=True, progress=False,
                              histogram_every=0, evaluate_train=False)
  # Its nn.Conv layers run as matmuls on CPU, so the epochs loop on the device.
  assert choose_execution(state, config, train["inputs"][:1]) == "scan"
  result = jaxtrain.fit(state, train, test=test, log=lambda _: None, config=config)
  assert result.test["accuracy"] >= 0.955, result.test
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
