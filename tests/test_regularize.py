"""L1/L2 penalty terms and input noise: hand-derived updates, logged curves,
per-step and per-row noise that is a function of the seed and not of the
devices."""

import csv
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain import Regularization, losses, models
from tests.helpers import classification_batch, tree_allclose, tree_equal


def state_with(reg, *, model=None, lr=0.1, optimizer="sgd", inputs_shape=(1, 6),
               loss_fn=losses.cross_entropy):
  model = model or models.MLP(hidden_sizes=(8,), outputs=3)
  return jaxtrain.create_train_state(model, jaxtrain.make_optimizer(optimizer, lr),
                                     jax.random.key(0), jnp.zeros(inputs_shape),
                                     loss_fn=loss_fn, regularization=reg)


def test_the_penalty_is_the_hand_computed_sum_over_every_parameter():
  params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.0]]),
                        "bias": jnp.array([3.0, -1.0])}}
  l1 = 0.1 * (1 + 2 + 0.5 + 0 + 3 + 1)
  l2 = 0.01 * (1 + 4 + 0.25 + 0 + 9 + 1)
  assert float(Regularization(l1=0.1).penalty(params)) == pytest.approx(l1, rel=1e-6)
  assert float(Regularization(l2=0.01).penalty(params)) == pytest.approx(l2, rel=1e-6)
  assert float(Regularization(l1=0.1, l2=0.01).penalty(params)) == pytest.approx(
      l1 + l2, rel=1e-6)


@pytest.mark.parametrize("l1, l2", [(0.0, 0.05), (0.02, 0.0), (0.02, 0.05)])
def test_an_sgd_step_adds_the_penalty_gradient_to_the_data_gradient(l1, l2):
  batch = classification_batch()
  plain = state_with(None)
  reg = state_with(Regularization(l1=l1, l2=l2))
  data_grads, _, _ = jaxtrain.compute_gradients(plain, batch, jax.random.key(1))
  new, metrics = jax.jit(jaxtrain.train_step)(reg, batch, jax.random.key(1))
  # Hand-derived: w - lr * (dL/dw + l1 * sign(w) + 2 * l2 * w).
  expected = jax.tree.map(lambda w, g: w - 0.1 * (g + l1 * jnp.sign(w) + 2 * l2 * w),
                          plain.params, data_grads)
  assert tree_allclose(new.params, expected, atol=1e-6)
  hand = sum(l1 * np.abs(w).sum() + l2 * (np.asarray(w) ** 2).sum()
             for w in jax.tree.leaves(plain.params))
  assert float(metrics["penalty"]) == pytest.approx(hand, rel=1e-5)
  # The logged loss is the data loss alone, comparable with evaluations.
  _, plain_metrics = jaxtrain.train_step(plain, batch, jax.random.key(1))
  assert float(metrics["loss"]) == float(plain_metrics["loss"])


def test_without_a_penalty_the_step_is_unchanged_bit_for_bit():
  batch = classification_batch()
  a, ma = jaxtrain.train_step(state_with(None), batch, jax.random.key(1))
  b, mb = jaxtrain.train_step(state_with(Regularization()), batch, jax.random.key(1))
  assert tree_equal(a.params, b.params) and sorted(ma) == sorted(mb)
  assert "penalty" not in mb


def test_gradient_accumulation_counts_the_penalty_once():
  batch = classification_batch(n=16)
  state = state_with(Regularization(l1=0.01, l2=0.03))
  whole, _, mw = jaxtrain.compute_gradients(state, batch, jax.random.key(2))
  parts, _, mp = jaxtrain.core.step.accumulate_gradients(state, batch, jax.random.key(2), 4)
  assert tree_allclose(whole, parts, atol=1e-6)
  assert float(mp["penalty"]) == pytest.approx(float(mw["penalty"]), rel=1e-6)


class Linear(nn.Module):
  """``x @ w`` with w = 1: the gradient of the mean output is the mean input."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones)(x)


def mean_output(outputs, targets):
  return outputs[:, 0]


def noisy_inputs_seen(state, batch, key):
  grads, _, _ = jaxtrain.compute_gradients(state, batch, key)
  return np.asarray(grads["Dense_0"]["kernel"][:, 0])


def test_input_noise_is_the_seeded_normal_of_each_row_and_step():
  std, n = 0.5, 8
  state = state_with(Regularization(input_noise=std), model=Linear(), inputs_shape=(1, 3),
                     loss_fn=mean_output)
  batch = {"inputs": np.zeros((n, 3), np.float32), "targets": np.zeros((n,), np.float32)}
  step_key = jax.random.key(7)
  seen = noisy_inputs_seen(state, batch, step_key)
  noise_key = jaxtrain.key_for(step_key, "input_noise")
  rows = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), (3,)))
                   for i in range(n)])
  np.testing.assert_allclose(seen, std * rows.mean(0), rtol=1e-5, atol=1e-7)
  assert len({tuple(r) for r in rows.round(6)}) == n  # each row its own noise
  again = noisy_inputs_seen(state, batch, jax.random.key(7))
  other = noisy_inputs_seen(state, batch, jax.random.key(8))
  assert np.array_equal(seen, again) and not np.allclose(seen, other)
  # Evaluations see the clean inputs.
  out = jaxtrain.eval_step(state, batch)
  assert float(out["loss"]) == 0.0


def noisy_fit(devices, seed=0, tmp=None):
  state = state_with(Regularization(input_noise=0.3, l2=1e-3))
  batch = classification_batch(n=64)
  config = jaxtrain.FitConfig(epochs=2, batch_size=16, seed=seed, devices=devices)
  return jaxtrain.fit(state, batch, config=config)


def test_input_noise_is_the_same_on_one_and_four_devices_and_follows_the_seed():
  one, four = noisy_fit(1), noisy_fit(4)
  assert tree_allclose(one.state.params, four.state.params, atol=1e-6)
  assert tree_equal(one.state.params, noisy_fit(1).state.params)
  assert not tree_allclose(one.state.params, noisy_fit(1, seed=1).state.params)
  clean = jaxtrain.fit(state_with(Regularization(l2=1e-3)), classification_batch(n=64),
                       config=jaxtrain.FitConfig(epochs=2, batch_size=16))
  assert not tree_allclose(one.state.params, clean.state.params)


def test_noise_on_integer_inputs_is_refused_by_name():
  reg = Regularization(input_noise=0.1)
  with pytest.raises(ValueError, match="--input-noise 0.1 needs float inputs, got int32"):
    reg.noisy(jnp.zeros((2, 3), jnp.int32), jax.random.key(0), 0)


@pytest.mark.parametrize("kwargs, named", [({"l1": -0.5}, "--l1"), ({"l2": float("nan")}, "--l2"),
                                           ({"input_noise": -1.0}, "--input-noise"),
                                           ({"l2": "0.1"}, "--l2")])
def test_bad_values_are_named(kwargs, named):
  with pytest.raises(ValueError, match=f"{named} must be a finite number >= 0"):
    Regularization(**kwargs)


def test_the_penalty_is_a_logged_curve_beside_the_data_loss(tmp_path, capsys):
  from experiments import _cli, two_moons

  workdir = tmp_path / "run"
  _cli.main(two_moons.Config, two_moons.main,
            ["--workdir", str(workdir), "--epochs", "3", "--l2", "1e-3", "--l1", "1e-4",
             "--samples", "200"])
  with open(workdir / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 and all(float(r["train_penalty"]) > 0 for r in rows)
  header = list(rows[0])
  assert header.index("train_penalty") == header.index("learning_rate") - 1
  steps = [json.loads(line) for line in open(workdir / "steps.jsonl")]
  assert all(s["penalty"] > 0 for s in steps)
  # The epoch value is the mean of its steps' terms.
  spe = len(steps) // 3
  assert float(rows[0]["train_penalty"]) == pytest.approx(
      np.mean([s["penalty"] for s in steps[:spe]]), rel=1e-12)
  events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").rglob("events.*"))
  assert b"epoch/train_penalty" in events and b"train/step_penalty" in events
  config = json.loads((workdir / "config.json").read_text())["config"]
  assert config["l1"] == 1e-4 and config["l2"] == 1e-3 and config["input_noise"] == 0.0
