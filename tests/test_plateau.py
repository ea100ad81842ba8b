"""ReduceLROnPlateau: PyTorch's numbers, on the device inside ``fit``, exact on
resume and when a trained state is continued.

The reference learning rates below are what
``torch.optim.lr_scheduler.ReduceLROnPlateau`` (torch 2.13.0, SGD lr 0.1) gives
on ``CURVE`` (``scheduler.step(value)`` once per value, then the group's lr),
each derivable by hand from PyTorch's rule: better means ``a < best * (1 -
threshold)`` ("min", "rel"), ``a < best - threshold`` ("abs"), ``a > best * (1
+ threshold)`` / ``a > best + threshold`` ("max"); NaN is never better; a bad
epoch in cooldown does not count; more than ``patience`` bad epochs multiply
the lr by ``factor`` (not below ``min_lr``, not by less than ``eps``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import datasets, losses, models
from jaxtrain import plateau as plateau_lib
from jaxtrain.core.plateau import ReduceLROnPlateau
from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer
from tests.helpers import tree_equal

NAN = math.nan
# Goes down, stalls, turns negative (where "rel" thresholds invert: PyTorch
# compares with best * (1 - threshold), which is *above* a negative best), holds a NaN.
CURVE = [1.0, 0.8, 0.8, 0.81, 0.79995, 0.7, -0.2, -0.2, -0.19, -0.21, -0.2101,
         -0.2102, NAN, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5]

# name -> (rule, the number of reductions in force after each value of CURVE)
TORCH = {
    # Epochs 3-4 are bad (0.8 not < 0.8 * 0.9999; 0.81); 0.79995 is not below
    # 0.8 * 0.9999 = 0.79992: the third bad epoch > patience 2 -> lr 0.01.
    # Epoch 6 on: 0.7 then the negatives improve or reset the count until the
    # NaN (one bad) and the flat -0.5s (-0.5 < -0.5 * 0.9999 = -0.49995: better!).
    "default_p2": (ReduceLROnPlateau(patience=2),
                   [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    # abs 0.01: 0.8, 0.81, 0.79995 are all within 0.01 of best 0.8.
    "min_abs": (ReduceLROnPlateau(patience=1, threshold=0.01, threshold_mode="abs",
                                  factor=0.5),
                [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6]),
    "max_rel": (ReduceLROnPlateau(mode="max", patience=1, threshold=0.1, factor=0.5),
                [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]),
    "max_abs_cooldown": (ReduceLROnPlateau(mode="max", patience=0, threshold=0.05,
                                           threshold_mode="abs", cooldown=2, factor=0.5),
                         [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7]),
    "rel_negative_p0": (ReduceLROnPlateau(patience=0, threshold=0.1, factor=0.9),
                        [0, 0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]),
}
# min_lr 0.02, eps 0.004: 0.1 -> 0.05 -> 0.025 -> 0.02 (clamped; a 0.005 step > eps)
# and then 0.02 -> max(0.01, 0.02) = 0.02, no change.
MIN_LR = (ReduceLROnPlateau(patience=0, factor=0.5, min_lr=0.02, eps=0.004),
          [0.1, 0.1, 0.05, 0.025] + [0.02] * 16)


def replay(rule, curve, learning_rate=0.1):
  state, lrs = plateau_lib.init(rule), []
  for value in curve:
    state = plateau_lib.step(rule, state, value, learning_rate)
    lrs.append(float(learning_rate * state.scale))
  return lrs


@pytest.mark.parametrize("name", sorted(TORCH))
def test_learning_rates_equal_pytorch(name):
  rule, reductions = TORCH[name]
  expected = [0.1 * rule.factor ** k for k in reductions]
  np.testing.assert_allclose(replay(rule, CURVE), expected, rtol=1e-6)


def test_min_lr_and_eps_equal_pytorch():
  rule, expected = MIN_LR
  np.testing.assert_allclose(replay(rule, CURVE), expected, rtol=1e-6)


def test_the_state_after_the_curve_equals_pytorch():
  rule, _ = TORCH["min_abs"]
  state = plateau_lib.init(rule)
  for value in CURVE:
    state = plateau_lib.step(rule, state, value, 0.1)
  # PyTorch: best -0.5, num_bad_epochs 0 (reset by the last reduction).
  assert float(state.best) == -0.5 and int(state.bad_epochs) == 0


@pytest.mark.parametrize("field,value,match", [
    ("factor", 1.0, "factor must be in"), ("mode", "avg", "mode must be"),
    ("patience", -1, "patience must be an integer"), ("threshold_mode", "pct", "threshold_mode"),
    ("min_lr", -0.1, "min_lr must be"), ("cooldown", 1.5, "cooldown must be an integer")])
def test_bad_settings_are_named(field, value, match):
  with pytest.raises(ValueError, match=f"reduce_lr_on_plateau {match}.*{value!r}"):
    ReduceLROnPlateau(**{field: value})


# -- inside fit -----------------------------------------------------------------

SPE = 5
X, Y = datasets.two_moons(jax.random.key(0), n_samples=200, noise=0.2)
TRAIN = {"inputs": np.asarray(X[:160], np.float32), "targets": np.asarray(Y[:160], np.int32)}
VAL = {"inputs": np.asarray(X[160:], np.float32), "targets": np.asarray(Y[160:], np.int32)}
# Improvements rarely count (10% better needed): the rate drops most epochs.
RULE = ReduceLROnPlateau(patience=0, threshold=0.1, factor=0.5)


def make_state(optimizer="sgd", lr=0.4, **kw):
  return jaxtrain.create_train_state(
      models.MLP(outputs=2, hidden_sizes=(8,)), jaxtrain.make_optimizer(optimizer, lr, **kw),
      jax.random.key(0), np.zeros((1, 2), np.float32), loss_fn=losses.cross_entropy)


def fit(epochs=8, state=None, checkpointer=None, should_stop=None, rule=RULE, **kw):
  config = jaxtrain.FitConfig(epochs=epochs, batch_size=32, progress=False, histogram_every=0,
                              reduce_lr_on_plateau=rule, **kw)
  return jaxtrain.fit(state or make_state(momentum=0.9), TRAIN, val=VAL, config=config,
                      checkpointer=checkpointer, should_stop=should_stop, log=lambda _: None)


@pytest.mark.parametrize("how", [{}, {"execution": "step"}, {"data": "host"}, {"devices": 4}])
def test_fit_steps_the_rule_on_the_validation_loss(how):
  result = fit(**how)
  rows = result.history["epoch"]
  # Each epoch trains at the rate the previous epochs' val_loss left.
  expected = replay(RULE, rows["val_loss"], 0.4)
  np.testing.assert_allclose(rows["learning_rate"][1:], expected[:-1], rtol=1e-6)
  assert rows["learning_rate"][0] == pytest.approx(0.4)
  assert len(set(rows["learning_rate"])) >= 3, "pick a rule that reduces several times"
  steps = np.asarray(result.history["step"]["learning_rate"]).reshape(-1, SPE)
  assert (steps == np.asarray(rows["learning_rate"])[:, None]).all()
  assert float(result.state.plateau.scale) * 0.4 == pytest.approx(expected[-1], rel=1e-6)


@pytest.mark.parametrize("optimizer,kw", [("sgd", {"momentum": 0.9}), ("adam", {}),
                                          ("adamw", {"weight_decay": 0.1})])
def test_a_scale_of_one_half_is_a_learning_rate_of_one_half(optimizer, kw):
  """The update is scaled after the optimizer, as the rate is (equal up to
  XLA's fusion of the last multiply-add, i.e. float rounding)."""
  half = make_state(optimizer, 0.2, **kw)
  scaled = make_state(optimizer, 0.4, **kw)
  scaled = scaled.replace(plateau=plateau_lib.init(RULE)._replace(
      scale=np.float32(0.5)))
  batch = {k: v[:32] for k, v in TRAIN.items()}
  step = jax.jit(jaxtrain.train_step)
  for i in range(3):
    half, _ = step(half, batch, jax.random.key(i))
    scaled, _ = step(scaled, batch, jax.random.key(i))
  for a, b in zip(jax.tree.leaves(half.params), jax.tree.leaves(scaled.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not tree_equal(half.params, make_state(optimizer, 0.4, **kw).params)


def test_resume_and_continued_training_are_the_same_run(tmp_path):
  whole = fit(epochs=8)
  polls = []

  def stop_at_epoch_3():
    polls.append(1)
    return "SIGTERM" if len(polls) == 3 else None

  checkpoint = CheckpointConfig(every_epochs=1, every_seconds=0)
  checkpointer = Checkpointer(tmp_path, checkpoint)
  try:
    first = fit(checkpointer=checkpointer, should_stop=stop_at_epoch_3)
  finally:
    checkpointer.close()
  assert first.stop_reason == "interrupted by SIGTERM"
  checkpointer = Checkpointer(tmp_path, checkpoint)
  try:
    resumed = fit(checkpointer=checkpointer)
  finally:
    checkpointer.close()
  continued = fit(epochs=8, state=fit(epochs=3).state)
  for other in (resumed, continued):
    assert tree_equal(other.state.params, whole.state.params)
    assert tree_equal(other.state.plateau, whole.state.plateau)
  for column in ("val_loss", "learning_rate"):
    assert resumed.history["epoch"][column] == whole.history["epoch"][column]
    assert continued.history["epoch"][column] == whole.history["epoch"][column][3:]


def test_a_monitor_that_is_no_evaluation_mean_is_refused():
  rule = dataclasses.replace(RULE, monitor="train_loss_running")
  with pytest.raises(ValueError, match="monitor 'train_loss_running' is not an evaluation "
                                       "metric.*val_loss"):
    fit(rule=rule)
  with pytest.raises(ValueError, match="monitor 'val_loss'.*train_accuracy"):
    jaxtrain.fit(make_state(), TRAIN, config=jaxtrain.FitConfig(
        epochs=1, batch_size=32, reduce_lr_on_plateau=RULE))
