"""train_step / eval_step: determinism, keys, masks, train/eval modes, metrics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain
from jaxtrain import data, losses, models
from tests.helpers import classification_batch, make_state, tree_allclose, tree_equal

step = jax.jit(jaxtrain.train_step)
evaluate = jax.jit(jaxtrain.eval_step)


def test_train_step_is_bitwise_deterministic():
  model = models.MLP(hidden_sizes=(16,), outputs=3, dropout_rate=0.3, batch_norm=True)
  state = make_state(model)
  batch = classification_batch()
  a, ma = step(state, batch, jax.random.key(7))
  b, mb = step(state, batch, jax.random.key(7))
  assert tree_equal((a.params, a.batch_stats, a.opt_state, ma),
                    (b.params, b.batch_stats, b.opt_state, mb))


def test_legacy_and_typed_keys_agree():
  model = models.MLP(hidden_sizes=(16,), outputs=3, dropout_rate=0.5)
  state = make_state(model)
  batch = classification_batch()
  a, _ = step(state, batch, jax.random.key(3))
  b, _ = step(state, batch, jax.random.PRNGKey(3))
  assert tree_equal(a.params, b.params)
  legacy_init = jaxtrain.create_train_state(
      model, state.tx, jax.random.PRNGKey(0), jnp.zeros((1, 6)), loss_fn=losses.cross_entropy)
  assert tree_equal(legacy_init.params, state.params)


def test_key_changes_dropout_update_only():
  batch = classification_batch()
  dropout = make_state(models.MLP(hidden_sizes=(16,), outputs=3, dropout_rate=0.5))
  a, _ = step(dropout, batch, jax.random.key(1))
  b, _ = step(dropout, batch, jax.random.key(2))
  assert not tree_allclose(a.params, b.params)
  plain = make_state(models.MLP(hidden_sizes=(16,), outputs=3))
  a, _ = step(plain, batch, jax.random.key(1))
  b, _ = step(plain, batch, jax.random.key(2))
  assert tree_equal(a.params, b.params)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_masked_rows_change_nothing(batch_norm):
  model = models.MLP(hidden_sizes=(16,), outputs=3, batch_norm=batch_norm)
  state = make_state(model, optimizer=("adam", 1e-2))
  real = classification_batch(n=6)
  garbage = classification_batch(n=2, seed=9)
  padded = {k: np.concatenate([real[k], garbage[k] * 100]) for k in real}
  padded["mask"] = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  a, ma = step(state, real, jax.random.key(0))
  b, mb = step(state, padded, jax.random.key(0))
  assert tree_allclose((a.params, a.batch_stats), (b.params, b.batch_stats), atol=1e-6)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
  assert float(mb["count"]) == 6.0
  ea, eb = evaluate(a, real), evaluate(a, padded)
  np.testing.assert_allclose(ea["loss"], eb["loss"], rtol=1e-6)
  assert float(eb["count"]) == 6.0


def test_metrics_equal_their_definitions():
  state = make_state(optimizer=("sgd", 0.1), clip_norm=1e-3)
  batch = classification_batch()
  new, metrics = step(state, batch, jax.random.key(0))

  def mean_loss(params):
    logits = state.apply_fn({"params": params}, batch["inputs"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  loss, grads = jax.value_and_grad(mean_loss)(state.params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  # grad_norm is measured before clipping (clip_norm is tiny here).
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
  logits = state.apply_fn({"params": state.params}, batch["inputs"], train=False)
  np.testing.assert_allclose(
      metrics["accuracy"], np.mean(np.argmax(logits, -1) == batch["targets"]))
  assert int(new.step) == 1


def test_binary_accuracy_for_single_logit():
  model = models.MLP(hidden_sizes=(4,), outputs=1)
  state = make_state(model, loss_fn=losses.binary_cross_entropy_with_logits)
  batch = {"inputs": np.ones((4, 6), np.float32), "targets": np.array([0, 1, 1, 1])}
  metrics = evaluate(state, batch)
  logit = float(state.apply_fn({"params": state.params}, batch["inputs"][:1], train=False)[0, 0])
  expected = 0.75 if logit > 0 else 0.25
  assert float(metrics["accuracy"]) == expected
  float_targets = {**batch, "targets": batch["targets"].astype(np.float32)}
  assert float(evaluate(state, float_targets)["accuracy"]) == expected
  mse_state = make_state(model, loss_fn=losses.mse)
  assert "accuracy" not in evaluate(mse_state, float_targets)


def test_eval_ignores_dropout_and_uses_running_averages():
  model = models.MLP(hidden_sizes=(16,), outputs=3, dropout_rate=0.5, batch_norm=True)
  state = make_state(model)
  batch = classification_batch()
  trained, _ = step(state, batch, jax.random.key(0))
  # train_step updates the running statistics...
  assert not tree_allclose(trained.batch_stats, state.batch_stats)
  # ...eval_step uses them (no dropout, no batch statistics) and changes nothing.
  logits = model.apply({"params": trained.params, "batch_stats": trained.batch_stats},
                       batch["inputs"], train=False)
  expected = losses.cross_entropy(logits, batch["targets"]).mean()
  m1, m2 = evaluate(trained, batch), evaluate(trained, batch)
  np.testing.assert_allclose(m1["loss"], expected, rtol=1e-6)
  assert tree_equal(m1, m2)
  single = evaluate(trained, {k: v[:1] for k, v in batch.items()})
  np.testing.assert_allclose(single["loss"], losses.cross_entropy(logits[:1], batch["targets"][:1])[0], rtol=1e-6)


def test_ragged_epoch_compiles_train_step_once():
  state = make_state()
  arrays = classification_batch(n=23)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def counted(state, batch, key):
    return jaxtrain.train_step(state, batch, key)

  for epoch in range(2):
    for i, batch in enumerate(data.batches(arrays, 5, key=jax.random.key(epoch))):
      state, _ = counted(state, batch, jax.random.fold_in(jax.random.key(0), i))
  assert int(state.step) == 10


@pytest.mark.parametrize("bad, message", [
    ({"x": np.ones((2, 6)), "targets": np.zeros(2, np.int32)}, "'inputs' and 'targets'"),
    ({"inputs": np.ones((2, 6))}, "'inputs' and 'targets'"),
    ({"inputs": np.ones((2, 6)), "targets": np.zeros(3, np.int32)}, "3 rows"),
    ({"inputs": np.ones((2, 6)), "targets": np.zeros((2, 5), np.int32)}, "(2, 5)"),
    ({"inputs": np.ones((2, 6)), "targets": np.zeros(2, np.int32), "mask": np.ones(3)}, "mask"),
])
def test_bad_batches_raise_value_error(bad, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    step(make_state(), bad, jax.random.key(0))


def test_example_inputs_without_batch_axis():
  with pytest.raises(ValueError, match=r"example_inputs .* shape \(6,\)"):
    jaxtrain.create_train_state(models.MLP(hidden_sizes=(4,), outputs=2),
                                jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0),
                                jnp.zeros((6,)), loss_fn=losses.cross_entropy)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_dropout_rate(rate):
  with pytest.raises(ValueError, match=f"dropout rate .*{rate}"):
    models.MLP(hidden_sizes=(4,), outputs=2, dropout_rate=rate)
  with pytest.raises(ValueError, match=f"dropout rate .*{rate}"):
    models.CNN(dropout_rate=rate)


def test_summarize_weights_by_count():
  state = make_state()
  arrays = classification_batch(n=7)
  per_batch = [evaluate(state, b) for b in data.batches(arrays, 3)]
  whole = evaluate(state, arrays)
  summary = jaxtrain.summarize(per_batch)
  np.testing.assert_allclose(summary["loss"], whole["loss"], rtol=1e-6)
  np.testing.assert_allclose(summary["accuracy"], whole["accuracy"], rtol=1e-6)
  assert summary["count"] == 7.0


def test_summarize_keeps_every_sum_it_is_given():
  """A user's own sums (e.g. of a top-2 accuracy) are summed and averaged like
  the loss, instead of silently dropped."""
  batches = [{"loss_sum": 2.0, "count": 2.0, "top2_sum": 2.0, "loss": 1.0},
             {"loss_sum": 3.0, "count": 1.0, "top2_sum": 0.0, "loss": 3.0}]
  assert jaxtrain.summarize(batches) == {"loss_sum": 5.0, "count": 3.0, "top2_sum": 2.0,
                                         "loss": 5.0 / 3.0, "top2": 2.0 / 3.0}


def test_summarize_needs_counts():
  with pytest.raises(ValueError, match="'count'"):
    jaxtrain.summarize([{"loss_sum": 1.0}])
  with pytest.raises(ValueError, match="empty"):
    jaxtrain.summarize([])


def test_a_hand_built_state_still_masks_batch_norm():
  """TrainState(...) built without create_train_state passes ``mask=`` to a model
  that takes it, as create_train_state's does."""
  model = models.MLP(hidden_sizes=(16,), outputs=3, batch_norm=True)
  made = make_state(model, optimizer=("adam", 1e-2))
  by_hand = jaxtrain.TrainState(step=made.step, params=made.params,
                                batch_stats=made.batch_stats, opt_state=made.opt_state,
                                apply_fn=model.apply, tx=made.tx, loss_fn=made.loss_fn)
  assert made.takes_mask is True and by_hand.takes_mask is None and by_hand.passes_mask
  padded = classification_batch(n=8)
  padded["mask"] = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
  a, _ = step(made, padded, jax.random.key(0))
  b, _ = step(by_hand, padded, jax.random.key(0))
  assert tree_allclose(a.batch_stats, b.batch_stats, rtol=0, atol=0)
