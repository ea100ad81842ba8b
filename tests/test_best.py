"""The best epoch, whatever the cadence: ``checkpoint.load(step="best")`` and
early stopping's restore give the parameters of the epoch with the best
monitored value, bitwise those of a run stopped at that epoch, even when no
checkpoint was ever saved at its end."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import checkpoint as ckpt
from jaxtrain import datasets, losses, models
from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer
from jaxtrain.train.stopping import EarlyStopping
from tests.helpers import tree_equal

SPE = 5  # 160 training points in batches of 32
EPOCHS = 8
# Saves every 3 steps and keeps 2: the best epoch's end (step 20) is never saved
# and never kept.
STEP_CADENCE = CheckpointConfig(every_steps=3, every_seconds=0, keep=2)


def moons():
  x, y = datasets.two_moons(jax.random.key(0), n_samples=200, noise=0.2)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  return {"inputs": x[:160], "targets": y[:160]}, {"inputs": x[160:], "targets": y[160:]}


TRAIN, VAL = moons()


def make_state(batch_norm=False):
  # Learning rate 0.8: val_loss is lowest at epoch 4, then worse.
  return jaxtrain.create_train_state(
      models.MLP(outputs=2, hidden_sizes=(8,), batch_norm=batch_norm),
      jaxtrain.make_optimizer("sgd", 0.8, momentum=0.9), jax.random.key(0),
      np.zeros((1, 2), np.float32), loss_fn=losses.cross_entropy)


def config(epochs=EPOCHS, **kw):
  return jaxtrain.FitConfig(epochs=epochs, batch_size=32, histogram_every=0, progress=False,
                            **kw)


def fit(workdir=None, checkpoint=STEP_CADENCE, epochs=EPOCHS, state=None, **kw):
  checkpointer = Checkpointer(workdir, checkpoint) if workdir is not None else None
  try:
    return jaxtrain.fit(state or make_state(), TRAIN, val=VAL, config=config(epochs, **kw),
                        checkpointer=checkpointer, log=lambda _: None)
  finally:
    if checkpointer is not None:
      checkpointer.close()


def ranked(history, column="val_loss", mode="min") -> int:
  """The best epoch of a history by ``column`` (the earliest of ties)."""
  values = np.asarray(history["epoch"][column])
  return int(np.argmin(values) if mode == "min" else np.argmax(values)) + 1


@pytest.mark.parametrize("how", [{}, {"execution": "step"}, {"data": "host"}, {"devices": 4},
                                 {"steps_per_call": 2}])
def test_load_best_is_the_best_epoch_under_a_step_cadence(tmp_path, how):
  result = fit(tmp_path, **how)
  best = ranked(result.history)
  assert 1 < best < EPOCHS, "pick a run whose best epoch is inside it"
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert best * SPE not in steps  # never saved at the best epoch's end

  assert ckpt.best_epoch(tmp_path) == {
      "epoch": best, "step": best * SPE, "value": result.history["epoch"]["val_loss"][best - 1]}
  assert result.best.epoch == best and result.best_step == best * SPE
  loaded = ckpt.load(tmp_path, step="best", like=make_state())
  stopped_there = fit(epochs=best, **how).state
  assert tree_equal(loaded.params, stopped_there.params)
  assert int(loaded.step) == EPOCHS * SPE  # the latest state's step and optimizer state


def test_best_batch_stats_are_kept_with_the_params(tmp_path):
  result = fit(tmp_path, state=make_state(batch_norm=True))
  best = ranked(result.history)
  loaded = ckpt.load(tmp_path, step="best", like=make_state(batch_norm=True))
  stopped_there = fit(epochs=best, state=make_state(batch_norm=True)).state
  assert tree_equal(loaded.params, stopped_there.params)
  assert tree_equal(loaded.batch_stats, stopped_there.batch_stats)
  assert not tree_equal(loaded.batch_stats, result.state.batch_stats)


@pytest.mark.parametrize("column,mode", [("val_accuracy", "max"), ("train_loss_running", "min")])
def test_the_checkpoint_monitor_ranks_the_epochs(tmp_path, column, mode):
  """An evaluation mean is ranked on the device; the epoch's mean training loss
  by the host, which then ends a call at every epoch end."""
  result = fit(tmp_path, checkpoint=dataclasses.replace(STEP_CADENCE, monitor=column,
                                                        mode=mode))
  best = ranked(result.history, column, mode)
  assert ckpt.best_epoch(tmp_path)["epoch"] == best == result.best.epoch
  loaded = ckpt.load(tmp_path, step="best", like=make_state())
  assert tree_equal(loaded.params, fit(epochs=best).state.params)


def test_a_resumed_run_keeps_the_best_of_before_the_interruption(tmp_path):
  polls = []

  def stop_at_step_24():  # call boundaries at multiples of 3
    polls.append(1)
    return "SIGTERM" if len(polls) == 8 else None

  checkpointer = Checkpointer(tmp_path, STEP_CADENCE)
  try:
    first = jaxtrain.fit(make_state(), TRAIN, val=VAL, config=config(),
                         checkpointer=checkpointer, should_stop=stop_at_step_24,
                         log=lambda _: None)
  finally:
    checkpointer.close()
  assert first.stop_reason == "interrupted by SIGTERM"
  assert len(first.history["epoch"]["epoch"]) == 4
  resumed = fit(tmp_path)
  whole = fit()
  assert resumed.history["epoch"] == whole.history["epoch"] | {
      "seconds": resumed.history["epoch"]["seconds"]}
  best = ranked(whole.history)
  assert best <= 4, "pick a run whose best epoch is before the interruption"
  loaded = ckpt.load(tmp_path, step="best", like=make_state())
  assert tree_equal(loaded.params, fit(epochs=best).state.params)


def test_early_stopping_restores_the_best_and_says_its_step():
  rule = EarlyStopping(patience=2)
  result = fit(early_stopping=rule, epochs=10)
  best = ranked(result.history)
  assert result.best.epoch == best and result.best_step == best * SPE
  assert result.restored_best
  assert int(result.state.step) == len(result.history["epoch"]["epoch"]) * SPE
  assert tree_equal(result.state.params, fit(epochs=best).state.params)
  kept = fit(early_stopping=dataclasses.replace(rule, restore_best=False), epochs=10)
  assert not kept.restored_best and kept.best_step == best * SPE
  assert not tree_equal(kept.state.params, result.state.params)


def test_a_checkpoint_without_best_parameters_resumes(tmp_path):
  """Runs that kept no best (``keep_best=False``, or an earlier jaxtrain)
  resume with the best ranked afresh from the resume on."""
  fit(tmp_path, checkpoint=dataclasses.replace(STEP_CADENCE, keep_best=False), epochs=2)
  result = fit(tmp_path, epochs=EPOCHS)
  rows = result.history["epoch"]
  assert rows["epoch"] == list(range(1, EPOCHS + 1))
  later = {"val_loss": rows["val_loss"][2:]}
  best = ranked({"epoch": later}) + 2
  assert result.best.epoch == best
  loaded = ckpt.load(tmp_path, step="best", like=make_state())
  assert tree_equal(loaded.params, fit(epochs=best).state.params)


def test_a_monitor_the_run_does_not_log_is_refused_before_writing(tmp_path):
  workdir = tmp_path / "run"
  checkpoint = dataclasses.replace(STEP_CADENCE, monitor="val_top5")
  with pytest.raises(ValueError, match="checkpoint monitor 'val_top5'.*val_accuracy"):
    jaxtrain.run.run(make_state(), TRAIN, val=VAL, config=config(), workdir=workdir,
                     record={"test": "monitor"}, checkpoint=checkpoint)
  assert not workdir.exists()
  # A factory of the user's (no .config): checked once it returns, before training.
  with pytest.raises(ValueError, match="checkpoint monitor 'val_top5'"):
    jaxtrain.fit(make_state(), TRAIN, val=VAL, config=config(),
                 checkpointer=lambda: Checkpointer(workdir, checkpoint))


def test_metrics_csv_of_a_run_with_best_tracking_is_unchanged(tmp_path):
  """Keeping the best on the device changes no number of the run."""
  tracked = fit(tmp_path)
  plain = fit(checkpoint=None)
  for column, values in plain.history["epoch"].items():
    if column != "seconds":
      assert tracked.history["epoch"][column] == values, column
  assert tree_equal(tracked.state.params, plain.state.params)
  assert math.isfinite(tracked.best.value)
