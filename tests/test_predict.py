"""jaxtrain.predict: deterministic outputs and Monte Carlo dropout."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxtrain

X = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)


def state_of(model):
  return jaxtrain.create_train_state(model, jaxtrain.make_optimizer("sgd", 0.1),
                                     jax.random.key(0), X[:1],
                                     loss_fn=jaxtrain.losses.cross_entropy)


class FlaxDocsMLP(nn.Module):
  """A model as the Flax docs write one: dropout as a call-time flag."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.Dropout(0.3)(x, deterministic=not train)
    return nn.Dense(4)(x)


@pytest.mark.parametrize("model", [
    jaxtrain.models.MLP(hidden_sizes=(32, 32), outputs=4, dropout_rate=0.3), FlaxDocsMLP()],
    ids=["jaxtrain MLP", "Flax docs MLP"])
def test_mc_dropout_equals_a_loop_over_the_same_keys(model):
  state = state_of(model)
  key, samples = jax.random.key(7), 16
  p = jaxtrain.predict(state, X, key=key, mc_samples=samples, transform=jax.nn.softmax,
                       return_samples=True)
  loop = np.stack([np.asarray(jax.nn.softmax(state.apply_fn(
      state.variables, X, train=True, rngs={"dropout": k})))
      for k in jax.random.split(key, samples)])
  np.testing.assert_allclose(p.samples, loop, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p.mean, loop.mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p.variance, loop.var(0), rtol=1e-5, atol=1e-9)
  assert float(p.variance.min()) >= 0 and float(p.variance.max()) > 1e-4
  # The same key gives the same numbers; another key other masks.
  again = jaxtrain.predict(state, X, key=key, mc_samples=samples, transform=jax.nn.softmax)
  assert np.array_equal(again.mean, p.mean)
  other = jaxtrain.predict(state, X, key=jax.random.key(8), mc_samples=samples)
  assert not np.allclose(other.mean, jaxtrain.predict(state, X, key=key, mc_samples=samples).mean)


def test_without_dropout_the_variance_is_zero():
  state = state_of(jaxtrain.models.MLP(hidden_sizes=(16,), outputs=4))
  p = jaxtrain.predict(state, X, key=jax.random.key(1), mc_samples=5)
  assert np.array_equal(p.variance, np.zeros_like(p.variance))
  np.testing.assert_allclose(p.mean, jaxtrain.predict(state, X), rtol=1e-6)


def trained_batch_norm_state(rate):
  state = state_of(jaxtrain.models.MLP(hidden_sizes=(16,), outputs=4, batch_norm=True,
                                       dropout_rate=rate))
  batch = {"inputs": X * 3 + 1, "targets": np.arange(37) % 4, "mask": np.ones(37, np.float32)}
  state, _ = jax.jit(jaxtrain.train_step)(state, batch, jax.random.key(2))  # real statistics
  return state


def test_batch_norm_runs_on_its_running_averages_and_stays_unchanged():
  state = trained_batch_norm_state(0.0)
  before = jax.tree.map(np.asarray, state.batch_stats)
  p = jaxtrain.predict(state, X, key=jax.random.key(3), mc_samples=4)
  assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.device_get(state.batch_stats)))
  # No dropout: every sample is the eval-mode pass (running averages)...
  np.testing.assert_allclose(p.mean, jaxtrain.predict(state, X), rtol=1e-6)
  assert np.array_equal(p.variance, np.zeros_like(p.variance))
  # ... not a train-mode pass, which normalises by this batch's statistics.
  train_mode, _ = state.apply_fn(state.variables, X, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(p.mean, train_mode, atol=1e-3)
  # With dropout, the masks are drawn while batch norm still uses its averages.
  dropped = trained_batch_norm_state(0.2)
  q = jaxtrain.predict(dropped, X, key=jax.random.key(3), mc_samples=64)
  assert float(q.variance.max()) > 1e-4
  np.testing.assert_allclose(q.mean, jaxtrain.predict(dropped, X), atol=0.25)


def test_batches_of_rows_give_the_deterministic_outputs_of_one_pass():
  state = state_of(jaxtrain.models.MLP(hidden_sizes=(16,), outputs=4, dropout_rate=0.5))
  whole = jaxtrain.predict(state, X)
  np.testing.assert_allclose(jaxtrain.predict(state, X, batch_size=8), whole, rtol=1e-6)
  np.testing.assert_allclose(whole, state.apply_fn(state.variables, X, train=False), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"mc_samples": -1}, "mc_samples must be an integer >= 0, got -1"),
    ({"mc_samples": 4}, "mc_samples=4 needs a key"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_named(kwargs, message):
  state = state_of(jaxtrain.models.MLP(hidden_sizes=(16,), outputs=4))
  with pytest.raises(ValueError, match=message):
    jaxtrain.predict(state, X, **kwargs)


def test_the_mc_dropout_experiment_writes_its_uncertainty_map(tmp_path, capsys):
  from experiments import mc_dropout

  workdir = tmp_path / "run"
  mc_dropout.main(mc_dropout.Config(workdir=workdir, samples=200, epochs=3, mc_samples=8,
                                    grid=16))
  assert (workdir / "uncertainty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert "mean of 8 MC dropout samples" in line and "uncertainty.png" in line


@pytest.mark.parametrize("args, named", [(["--dropout", "0"], "--dropout"),
                                         (["--mc-samples", "1"], "--mc-samples"),
                                         (["--grid", "1"], "--grid")])
def test_the_mc_dropout_experiment_refuses_bad_values(args, named, tmp_path, capsys):
  from experiments import _cli, mc_dropout

  with pytest.raises(SystemExit) as exit_:
    _cli.main(mc_dropout.Config, mc_dropout.main,
              args=["--workdir", str(tmp_path / "run"), *args])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and len(err.splitlines()) == 1 and named in err, err
  assert not (tmp_path / "run").exists()
