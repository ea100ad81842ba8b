"""The exponential moving average of the parameters: the formula, its
evaluations and curves, ranking by it, and an exact resume."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain import losses, models
from jaxtrain.engine.best import BestRule
from tests.helpers import classification_batch, tree_allclose, tree_equal


def ema_state(decay=0.9, **kwargs):
  return jaxtrain.create_train_state(
      models.MLP(hidden_sizes=(8,), outputs=3), jaxtrain.make_optimizer("sgd", 0.5),
      jax.random.key(0), jnp.zeros((1, 6)), loss_fn=losses.cross_entropy, ema_decay=decay,
      **kwargs)


def test_the_average_follows_the_formula_over_three_steps():
  state = ema_state(0.8)
  assert tree_equal(state.ema, state.params)  # starts at the initial parameters
  hand = jax.tree.map(np.asarray, state.params)
  step = jax.jit(jaxtrain.train_step)
  for k in range(3):
    state, _ = step(state, classification_batch(seed=k), jax.random.key(k))
    hand = jax.tree.map(lambda e, p: 0.8 * e + 0.2 * np.asarray(p), hand, state.params)
  assert tree_allclose(state.ema, hand, rtol=1e-6, atol=1e-7)
  assert not tree_allclose(state.ema, state.params, atol=1e-4)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.ema))


def test_the_average_is_a_checkpointed_array_of_the_state():
  arrays = jaxtrain.core.state.state_arrays(ema_state())
  assert "ema" in arrays
  assert "ema" not in jaxtrain.core.state.state_arrays(ema_state(None))


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1, True])
def test_a_decay_outside_the_open_interval_is_refused(decay):
  with pytest.raises(ValueError, match=r"--ema \(the EMA decay\) must be in \(0, 1\)"):
    ema_state(decay)


def fit_with(decay, data="device", epochs=3, **config):
  batch = classification_batch(n=64)
  return jaxtrain.fit(ema_state(decay), batch,
                      config=jaxtrain.FitConfig(epochs=epochs, batch_size=16, data=data,
                                                **config),
                      val=batch, test=batch)


def test_evaluations_report_the_average_beside_the_parameters_on_both_data_paths():
  device, stream = fit_with(0.9), fit_with(0.9, data="stream")
  epochs = device.history["epoch"]
  assert {"val_ema_loss", "val_ema_accuracy"} <= set(epochs)
  assert epochs["val_ema_loss"] != epochs["val_loss"]
  assert stream.history["epoch"]["val_ema_loss"] == epochs["val_ema_loss"]
  # The final evaluation of the average equals evaluating its parameters.
  averaged = device.state.with_ema_params()
  direct = jaxtrain.summarize([jaxtrain.eval_step(averaged, classification_batch(n=64))])
  assert device.test["ema_loss"] == pytest.approx(float(direct["loss"]), rel=1e-6)
  assert "ema_loss" not in fit_with(None).test


def test_ranking_by_the_average_restores_the_average():
  rule = jaxtrain.EarlyStopping("val_ema_loss", patience=50)
  result = fit_with(0.5, early_stopping=rule)
  assert BestRule.for_column("val_ema_loss", ("val",)) == BestRule("val_ema", "loss")
  assert result.restored_best
  best = result.history["epoch"]["val_ema_loss"]
  assert result.best.epoch == int(np.argmin(best)) + 1
  # The restored parameters are the average at the end of the best epoch.
  at_best = fit_with(0.5, epochs=result.best.epoch).state
  assert tree_allclose(result.state.params, at_best.ema, atol=1e-7)
  assert not tree_allclose(result.state.params, at_best.params, atol=1e-4)


def run_two_moons(workdir, *args):
  from experiments import _cli, two_moons

  _cli.main(two_moons.Config, two_moons.main,
            ["--workdir", str(workdir), "--samples", "200", "--ema", "0.9", *args])
  with open(workdir / "metrics.csv") as f:
    rows = list(csv.reader(f))
  at = rows[0].index("seconds")
  return [r[:at] + r[at + 1:] for r in rows]


def test_a_continued_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, capsys):
  straight = run_two_moons(tmp_path / "a", "--epochs", "4")
  run_two_moons(tmp_path / "b", "--epochs", "2")
  continued = run_two_moons(tmp_path / "b", "--epochs", "4")
  assert "val_ema_loss" in straight[0] and len(straight) == 5
  assert continued == straight
