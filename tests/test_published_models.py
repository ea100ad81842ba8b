"""Models as their authors published them (tests/published.py) through every
part of jaxtrain: any Linen module, any output pytree, RNG streams, axis names,
and accuracy only where a loss defines one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain
from jaxtrain import losses
from tests import published

QUIET = dict(progress=False, histogram_every=0)


def _bits(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(_bits(a), _bits(b), strict=True))


def _classes(n=96, dim=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  return {"inputs": x, "targets": (np.argmax(x[:, :classes], 1)).astype(np.int32)}


@pytest.mark.parametrize("make, classes", [
    (lambda: nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)]), 3),  # a list field
    (published.Foo, 2),  # Sequential inside, as the docstring writes it
], ids=["Sequential", "docstring_Foo"])
def test_sequential_models_train_through_jit_and_fit(make, classes):
  data = _classes(classes=classes)
  tx = optax.sgd(0.1)
  state = jaxtrain.create_train_state(make(), tx, jax.random.key(0),
                                      data["inputs"][:1], loss_fn=losses.cross_entropy)
  step = jax.jit(jaxtrain.train_step)
  batch = {k: v[:32] for k, v in data.items()}
  new, metrics = step(state, batch, jax.random.key(1))
  assert np.isfinite(metrics["loss"]) and "accuracy" in metrics
  # A second state of an equal (unhashable) module reuses the compiled step.
  other = jaxtrain.create_train_state(make(), tx, jax.random.key(0),
                                      data["inputs"][:1], loss_fn=losses.cross_entropy)
  assert other.apply_fn == state.apply_fn
  compiled = step._cache_size()  # jit shares its cache across jax.jit(train_step)s
  step(other, batch, jax.random.key(1))
  assert step._cache_size() == compiled
  result = jaxtrain.fit(state, data, val=data, log=lambda _: None,
                        config=jaxtrain.FitConfig(epochs=3, batch_size=32, **QUIET))
  val = result.history["epoch"]["val_loss"]
  assert val[-1] < val[0]


def test_the_flax_imagenet_resnet18_trains_one_epoch_through_fit():
  """flax examples/imagenet/models.py as published: list stage_sizes, strided
  and 1x1 convs, batch norm with axis_name='batch' (bound on one device)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(128, 32, 32, 3)).astype(np.float32)
  y = (x[:, :16, :, 0].mean((1, 2)) > 0).astype(np.int32) + 2 * (x[..., 1].mean((1, 2)) > 0)
  model = published.ResNet18(num_classes=4, num_filters=8)
  state = jaxtrain.create_train_state(model, optax.sgd(0.05, momentum=0.9), jax.random.key(0),
                                      x[:1], loss_fn=losses.cross_entropy)
  assert state.batch_stats and "bn_init" in state.batch_stats
  result = jaxtrain.fit(state, {"inputs": x, "targets": y.astype(np.int32)}, log=lambda _: None,
                        config=jaxtrain.FitConfig(epochs=1, batch_size=16, **QUIET))
  steps = np.asarray(result.history["step"]["loss"])
  assert len(steps) == 8 and np.isfinite(steps).all()
  assert steps[-3:].mean() < steps[:3].mean(), steps
  # Batch norm statistics moved in training, and evaluation uses them.
  assert not _equal(result.state.batch_stats, state.batch_stats)
  assert np.isfinite(jaxtrain.predict(result.state, x[:4])).all()


class TupleNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(16)(x))
    h = nn.Dropout(0.2, deterministic=not train)(h)
    return nn.Dense(3)(h), h


class DictNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x))
    return {"logits": nn.Dense(3)(h), "aux": {"norm": jnp.sum(h * h, -1)}}


def _tuple_loss(outputs, y):
  logits, hidden = outputs
  return losses.cross_entropy(logits, y) + 1e-3 * jnp.mean(hidden**2, -1)


def _dict_loss(outputs, y):
  return losses.cross_entropy(outputs["logits"], y) + 1e-4 * outputs["aux"]["norm"]


@pytest.mark.parametrize("model, loss, logits_of", [
    (TupleNet(), _tuple_loss, lambda o: o[0]),
    (DictNet(), _dict_loss, lambda o: o["logits"]),
], ids=["tuple", "dict"])
def test_pytree_outputs_through_step_fit_and_predict(model, loss, logits_of):
  data = _classes()
  loss = losses.with_accuracy(loss, lambda o, y: losses.cross_entropy.accuracy(logits_of(o), y))
  state = jaxtrain.create_train_state(model, optax.adam(1e-2), jax.random.key(0),
                                      data["inputs"][:1], loss_fn=loss)
  batch = {k: v[:32] for k, v in data.items()}
  _, metrics = jax.jit(jaxtrain.train_step)(state, batch, jax.random.key(1))
  assert set(metrics) >= {"loss", "accuracy"}
  config = jaxtrain.FitConfig(epochs=3, batch_size=32, **QUIET)
  result = jaxtrain.fit(state, data, val=data, log=lambda _: None, config=config)
  epochs = result.history["epoch"]
  lengths = {name: len(values) for name, values in epochs.items()}
  assert set(lengths.values()) == {3}, lengths  # one value per epoch, never ragged
  assert epochs["val_accuracy"][-1] > 0.6
  out = jaxtrain.predict(result.state, data["inputs"], batch_size=40)  # 3 row batches
  assert jax.tree.structure(out) == jax.tree.structure(model.apply(
      {"params": result.state.params}, data["inputs"][:2]))
  np.testing.assert_allclose(logits_of(out), logits_of(model.apply(
      {"params": result.state.params}, data["inputs"])), rtol=1e-5, atol=1e-6)
  mc = jaxtrain.predict(result.state, data["inputs"][:8], key=jax.random.key(2), mc_samples=4)
  assert jax.tree.structure(mc.mean) == jax.tree.structure(out)
  assert jax.tree.map(jnp.shape, mc.variance) == jax.tree.map(lambda o: o[:8].shape, out)


def test_a_loss_of_ones_own_logs_no_accuracy_unless_given_one():
  data = _classes()
  plain = jaxtrain.create_train_state(TupleNet(), optax.sgd(0.1), jax.random.key(0),
                                      data["inputs"][:1], loss_fn=_tuple_loss)
  batch = {k: v[:32] for k, v in data.items()}
  assert "accuracy" not in jax.jit(jaxtrain.train_step)(plain, batch, jax.random.key(1))[1]
  assert "correct" not in jax.jit(jaxtrain.eval_step)(plain, batch)
  given = plain.replace(accuracy_fn=lambda o, y: (jnp.argmax(o[0], -1) == y))
  assert float(jax.jit(jaxtrain.eval_step)(given, batch)["accuracy"]) > 0
  # ... and accuracy=False turns a loss's own off.
  off = jaxtrain.create_train_state(DictNet(), optax.sgd(0.1), jax.random.key(0),
                                    data["inputs"][:1], loss_fn=losses.cross_entropy,
                                    accuracy=False)
  assert off.accuracy is None


def test_an_mse_regression_on_integer_targets_logs_no_accuracy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  counts = rng.poisson(3, size=(64, 1)).astype(np.int32)  # integer targets
  state = jaxtrain.create_train_state(jaxtrain.models.MLP(hidden_sizes=(8,), outputs=1),
                                      optax.sgd(0.01), jax.random.key(0), x[:1],
                                      loss_fn=losses.mse)
  result = jaxtrain.fit(state, {"inputs": x, "targets": counts}, val={"inputs": x, "targets": counts},
                        log=lambda _: None, config=jaxtrain.FitConfig(epochs=2, batch_size=16,
                                                                      **QUIET))
  epochs = result.history["epoch"]
  for column in ("train_accuracy", "val_accuracy"):
    assert column not in epochs or np.isnan(epochs[column]).all(), (column, epochs[column])
  assert "accuracy" not in result.history["step"]


def _vae_loss(outputs, x):
  recon_x, mean, logvar = outputs
  return published.binary_cross_entropy_with_logits(recon_x, x) + published.kl_divergence(
      mean, logvar)


class StreamVAE(nn.Module):
  """A VAE that draws its noise from a stream, ``self.make_rng('z')``."""

  @nn.compact
  def __call__(self, x):
    mean, logvar = published.Encoder(4)(x)
    z = published.reparameterize(self.make_rng("z"), mean, logvar)
    return published.Decoder()(z), mean, logvar


@pytest.mark.parametrize("model", [published.VAE(latents=4), StreamVAE()],
                         ids=["z_rng_argument", "make_rng_z"])
def test_a_vae_draws_its_z_stream_per_step_reproducibly(model):
  rng = np.random.default_rng(0)
  x = (rng.random((64, 784)) > 0.7).astype(np.float32)
  data = {"inputs": x, "targets": x}

  def run(seed):
    state = jaxtrain.create_train_state(model, optax.adam(1e-3), jax.random.key(0), x[:1],
                                        loss_fn=_vae_loss)
    config = jaxtrain.FitConfig(epochs=2, batch_size=16, seed=seed, **QUIET)
    return jaxtrain.fit(state, data, val=data, log=lambda _: None, config=config)

  a, b, other = run(0), run(0), run(1)
  assert _equal(a.state.params, b.state.params)
  assert not _equal(a.state.params, other.state.params)
  assert "val_accuracy" not in a.history["epoch"] or np.isnan(a.history["epoch"]["val_accuracy"]).all()
  # Evaluation draws z from a fixed key: deterministic.
  batch = {"inputs": x[:16], "targets": x[:16]}
  evaluate = jax.jit(jaxtrain.eval_step)
  assert float(evaluate(a.state, batch)["loss"]) == float(evaluate(a.state, batch)["loss"])
  # In a training step the stream's key is a pure function of the step's key.
  step = jax.jit(jaxtrain.train_step)
  one, _ = step(a.state, batch, jax.random.key(5))
  two, _ = step(a.state, batch, jax.random.key(5))
  three, _ = step(a.state, batch, jax.random.key(6))
  assert _equal(one.params, two.params) and not _equal(one.params, three.params)


class Norm(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
    return nn.Dense(3)(nn.relu(x))


def test_an_axis_name_model_on_one_device_equals_it_without_the_axis():
  data = _classes(n=64)
  config = jaxtrain.FitConfig(epochs=2, batch_size=16, **QUIET)
  runs = {}
  for axis in (None, jaxtrain.parallel.AXIS):
    state = jaxtrain.create_train_state(Norm(axis_name=axis), optax.sgd(0.1, momentum=0.9),
                                        jax.random.key(0), data["inputs"][:1],
                                        loss_fn=losses.cross_entropy)
    batch = {k: v[:16] for k, v in data.items()}
    stepped, _ = jax.jit(jaxtrain.train_step)(state, batch, jax.random.key(1))
    runs[axis] = (stepped, jaxtrain.fit(state, data, val=data, log=lambda _: None,
                                        config=config).state)
  (step_a, fit_a), (step_b, fit_b) = runs.values()
  for a, b in ((step_a, step_b), (fit_a, fit_b)):  # a size-1 axis changes no bit
    assert _equal((a.params, a.batch_stats), (b.params, b.batch_stats))


def test_an_axis_name_model_runs_under_shard_map_then_on_one_device():
  """Whether the axis is bound is asked at every trace, never remembered."""
  data = _classes(n=16)
  state = jaxtrain.create_train_state(Norm(axis_name=jaxtrain.parallel.AXIS), optax.sgd(0.1),
                                      jax.random.key(0), data["inputs"][:1],
                                      loss_fn=losses.cross_entropy)
  train, _ = jaxtrain.parallel.shard_map_steps(
      jaxtrain.parallel.local_mesh(jax.local_devices()[:2]), donate=False)
  batch = {k: v[:8] for k, v in data.items()}
  train(state, batch, jax.random.key(1))  # per device: 4 rows, the axis bound
  alone, _ = jax.jit(jaxtrain.train_step)(state, {k: v[:4] for k, v in batch.items()},
                                          jax.random.key(1))
  assert np.isfinite(jax.tree.leaves(alone.params)[0]).all()


class MaskedNorm(nn.Module):
  """flax's nn.BatchNorm takes a mask broadcastable to its input: jaxtrain's
  mask is one weight per row, so a model gives it a trailing axis."""

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(
        x, mask=None if mask is None else mask[:, None])
    return nn.Dense(3)(x)


def test_a_mask_passed_to_flax_batch_norm_keeps_padding_out_of_its_statistics():
  data = _classes(n=16)
  state = jaxtrain.create_train_state(MaskedNorm(), optax.sgd(0.1), jax.random.key(0),
                                      data["inputs"][:1], loss_fn=losses.cross_entropy)
  assert state.takes_mask
  step = jax.jit(jaxtrain.train_step)
  real = {k: v[:12] for k, v in data.items()}
  padded = {"inputs": np.concatenate([real["inputs"], 100 + np.zeros((4, 4), np.float32)]),
            "targets": np.concatenate([real["targets"], np.zeros(4, np.int32)]),
            "mask": np.array([1.0] * 12 + [0.0] * 4, np.float32)}
  a, _ = step(state, real, jax.random.key(1))
  b, _ = step(state, padded, jax.random.key(1))
  for x, y in zip(_bits((a.params, a.batch_stats)), _bits((b.params, b.batch_stats)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


class NeedsContext(nn.Module):
  @nn.compact
  def __call__(self, x, context):
    return nn.Dense(2)(x + context)


class Sown(nn.Module):
  @nn.compact
  def __call__(self, x):
    counter = self.variable("counters", "seen", jnp.zeros, ())
    counter.value += 1
    return nn.Dense(2)(x)


@pytest.mark.parametrize("model, words", [
    (NeedsContext(), ["'context'", "give 'context' a default"]),
    (Sown(), ["'counters'", "not supported"]),
    ("not a model", ["flax.linen.Module", "str"]),
], ids=["required_argument", "other_collection", "not_a_module"])
def test_what_is_not_supported_is_refused_in_one_line(model, words):
  with pytest.raises(ValueError) as raised:
    jaxtrain.create_train_state(model, optax.sgd(0.1), jax.random.key(0), np.zeros((1, 2)),
                                loss_fn=losses.cross_entropy)
  message = str(raised.value)
  assert "\n" not in message and all(w in message for w in words), message


class TwoHeads(nn.Module):
  def setup(self):
    self.head = nn.Dense(3)  # a submodule built in setup

  def __call__(self, x):
    return self.head(x)

  def features(self, x):
    return self.head(x) * 2


def test_a_method_other_than_call_trains_when_asked_for():
  data = _classes()
  state = jaxtrain.create_train_state(TwoHeads(), optax.sgd(0.1), jax.random.key(0),
                                      data["inputs"][:1], loss_fn=losses.cross_entropy,
                                      method="features")
  out = jaxtrain.predict(state, data["inputs"][:2])
  np.testing.assert_allclose(out, 2 * TwoHeads().apply({"params": state.params},
                                                       data["inputs"][:2]), rtol=1e-6)
  with pytest.raises(ValueError, match="no method 'nope'"):
    jaxtrain.create_train_state(TwoHeads(), optax.sgd(0.1), jax.random.key(0),
                                data["inputs"][:1], loss_fn=losses.cross_entropy, method="nope")
