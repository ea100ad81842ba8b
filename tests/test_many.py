"""Seeds and learning rates in one vmapped program; the host-streaming feed."""

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import losses, many, models
from tests.helpers import tree_allclose, tree_equal

MODEL = models.MLP(hidden_sizes=(8,), outputs=2, dropout_rate=0.1)


def arrays(seed=0, n=70):
  x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
  return {"inputs": x, "targets": (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int32)}


def state(seed, tx):
  return jaxtrain.create_train_state(MODEL, tx, jax.random.key(seed), np.zeros((1, 3)),
                                     loss_fn=losses.cross_entropy)


CONFIG = jaxtrain.FitConfig(epochs=3, batch_size=16)


@pytest.mark.parametrize("member_data", [False, True])
def test_vmapped_seeds_equal_separate_runs(member_data):
  tx = jaxtrain.make_optimizer("sgd", 0.1, momentum=0.9)
  seeds = [3, 4, 5]
  data = [arrays(s) for s in seeds] if member_data else [arrays()] * 3
  train = many.stack(data) if member_data else data[0]
  result = many.fit_many(many.stack([state(s, tx) for s in seeds]), train, val=train,
                         test=train, seeds=seeds, member_data=member_data, config=CONFIG)
  for m, seed in enumerate(seeds):
    single = jaxtrain.fit(state(seed, tx), data[m], val=data[m], test=data[m],
                          config=jaxtrain.FitConfig(epochs=3, batch_size=16, seed=seed),
                          log=lambda _: None)
    assert tree_allclose(many.unstack(result.state.params, m), single.state.params,
                         rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.steps["loss"][m], single.history["step"]["loss"],
                               rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in result.epochs[m]],
                               single.history["epoch"]["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(result.test[m]["accuracy"], single.test["accuracy"])
  # Different seeds really train differently.
  assert not tree_allclose(many.unstack(result.state.params, 0),
                           many.unstack(result.state.params, 1))


def test_learning_rates_in_one_program():
  tx = jaxtrain.make_optimizer("sgd", 0.1)
  rates = [0.01, 0.1, 0.5]
  stacked = many.stack([many.with_learning_rate(state(0, tx), lr) for lr in rates])
  result = many.fit_many(stacked, arrays(), seeds=[0, 0, 0], config=CONFIG)
  for m, lr in enumerate(rates):
    single = jaxtrain.fit(state(0, jaxtrain.make_optimizer("sgd", lr)), arrays(),
                          config=CONFIG, log=lambda _: None)
    assert tree_allclose(many.unstack(result.state.params, m), single.state.params,
                         rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.steps["learning_rate"][m], lr, rtol=1e-6)


def test_fit_many_rejects_mismatched_seeds():
  tx = jaxtrain.make_optimizer("sgd", 0.1)
  with pytest.raises(ValueError, match="seeds has 2 entries for 3"):
    many.fit_many(many.stack([state(s, tx) for s in range(3)]), arrays(), seeds=[0, 1],
                  config=CONFIG)


def test_host_feed_equals_device_feed():
  model = models.MLP(hidden_sizes=(8,), outputs=2, dropout_rate=0.2, batch_norm=True)
  tx = jaxtrain.make_optimizer("adam", 0.01)
  results = []
  for data in ("device", "host"):
    start = jaxtrain.create_train_state(model, tx, jax.random.key(0), np.zeros((1, 3)),
                                        loss_fn=losses.cross_entropy)
    results.append(jaxtrain.fit(
        start, arrays(), val=arrays(1), test=arrays(2), log=lambda _: None,
        config=jaxtrain.FitConfig(epochs=3, batch_size=16, data=data, execution="scan")))
  device, host = results
  # Same batches, same keys, same compiled step body: equal to the bit here.
  assert tree_equal((device.state.params, device.state.batch_stats),
                    (host.state.params, host.state.batch_stats))
  assert device.history["epoch"]["val_loss"] == host.history["epoch"]["val_loss"]
  assert device.test == host.test


def test_host_feed_rejects_eval_every_steps():
  with pytest.raises(ValueError, match="eval_every_steps needs the data on the device"):
    jaxtrain.fit(state(0, jaxtrain.make_optimizer("sgd", 0.1)), arrays(), val=arrays(),
                 config=jaxtrain.FitConfig(epochs=1, batch_size=16, data="host",
                                           eval_every_steps=2))
