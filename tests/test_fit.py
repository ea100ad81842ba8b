"""fit(): determinism, early stopping, exact aggregation, NaN guard, execution modes.

Every run here is tiny (a 6-8-3 MLP on 50 rows), but each ``fit`` still compiles
its programs (~1-2 s on CPU), so runs that several tests look at are computed
once per module (``_once``) and the module uses a private persistent
compilation cache. Runs are pure functions of their seed, so sharing them
between tests changes nothing but the time.

Exactness: two runs of the same program (same seed, same config, same device
count, same execution) are compared bitwise. Runs whose compiled programs
differ (1 vs 4 devices, ``fit`` vs a hand-written loop of ``train_step``, an
evaluation inside the compiled program vs ``model.apply``) are compared with
tolerances: XLA may fuse and order float reductions differently in different
programs. The execution modes (one step per call, a scanned epoch, K steps per
call) are compared both ways: with tolerances, and bitwise, which is what
jaxtrain.engine.programs promises (it makes a mid-epoch resume exact).
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain import data, losses, models
from jaxtrain.core.keys import key_for
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.train.config import COLUMNS, FitConfig
from jaxtrain.train.stopping import Best, EarlyStopping
from tests.helpers import make_state, moons_split, tree_allclose, tree_equal

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


# --------------------------------------------------------------------------- data


def learnable(n: int, seed: int, features: int = 6, classes: int = 3) -> dict:
  """Gaussian inputs labelled by a fixed linear rule (the same rule for every seed)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  w = np.random.default_rng(1234).normal(size=(features, classes))
  return {"inputs": x, "targets": np.argmax(x @ w, axis=1).astype(np.int32)}


TRAIN = learnable(50, seed=1)  # batch 8: 7 steps, the last one of 2 rows
VAL = learnable(20, seed=2)
DROPOUT_MLP = models.MLP(hidden_sizes=(8,), outputs=3, dropout_rate=0.25)
PLAIN_MLP = models.MLP(hidden_sizes=(8,), outputs=3)
# eval_batch_size 16 makes the evaluations ragged too (50 = 3 * 16 + 2, 20 = 16 + 4).
BASE = dict(epochs=3, batch_size=8, eval_batch_size=16)


_TEMPLATES: dict = {}


def new_state(model=DROPOUT_MLP, features=6):
  """A fresh copy of the model's initial state (initialised once: init compiles).

  A copy per fit: fit donates the arrays of the state it is given (see
  test_fit_leaves_the_callers_state_usable).
  """
  key = (id(model), features)
  if key not in _TEMPLATES:
    _TEMPLATES[key] = make_state(model, optimizer=("sgd", 0.1), momentum=0.9,
                                 inputs_shape=(1, features))
  return jax.tree.map(lambda x: jnp.array(x, copy=True), _TEMPLATES[key])


def train(model=DROPOUT_MLP, *, train=TRAIN, val=VAL, state=None, monitor=None, **config):
  messages: list[str] = []
  config = {"progress": False, "histogram_every": 0, **config}
  if state is None:
    state = new_state(model, features=train["inputs"].shape[1])
  result = jaxtrain.fit(state, train, val=val,
                        config=FitConfig(**config), monitor=monitor, log=messages.append)
  return result, messages


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A private persistent compilation cache for this module, restored afterwards.

  Many runs here compile the very same programs (the seed, the epoch count and
  early stopping are not part of them); loading those from the cache instead of
  compiling each again keeps the module fast on two CPU cores.
  """
  from jax.experimental.compilation_cache import compilation_cache

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


_RUNS: dict = {}


def _once(name, fn):
  """Computes a run once per module (runs are pure functions of their inputs)."""
  if name not in _RUNS:
    _RUNS[name] = fn()
  return _RUNS[name]


def base_run(seed=0):
  return _once(("base", seed), lambda: train(seed=seed, **BASE)[0])


# ---------------------------------------------------------------------- helpers


def epoch_rows(history) -> dict:
  """The epoch table without the wall-clock column."""
  rows = {k: v for k, v in history["epoch"].items() if k != "seconds"}
  assert set(rows) == set(COLUMNS) - {"seconds"}
  return rows


def columns_equal(a: dict, b: dict) -> bool:
  """Bitwise equality of two tables of float columns (NaN equals NaN)."""
  return set(a) == set(b) and all(
      np.array_equal(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                     equal_nan=True) for k in a)


def columns_allclose(a: dict, b: dict, **tol) -> bool:
  return set(a) == set(b) and all(
      np.allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                  equal_nan=True, **tol) for k in a)


def direct_metrics(state, arrays) -> dict[str, float]:
  """Mean per-example loss and accuracy of a whole set in eval mode, no batching."""
  logits = state.apply_fn({"params": state.params}, jnp.asarray(arrays["inputs"]), train=False)
  per_example = losses.cross_entropy(logits, jnp.asarray(arrays["targets"]))
  correct = jnp.argmax(logits, -1) == arrays["targets"]
  return {"loss": float(np.mean(np.asarray(per_example, np.float64))),
          "accuracy": float(np.mean(np.asarray(correct, np.float64)))}


_step = jax.jit(jaxtrain.train_step)


def epoch_batch(arrays, seed, epoch, index, batch_size, drop_remainder=False) -> dict:
  """Batch ``index`` of ``epoch`` (0-based) as fit draws it: the permutation comes
  from ``key_for(key(seed), "shuffle", epoch)`` (see jaxtrain.engine.programs)."""
  n = len(arrays["targets"])
  idx, mask = jax.device_get(data.epoch_indices(
      key_for(jax.random.key(seed), "shuffle", epoch), n, batch_size, drop_remainder))
  return {"inputs": arrays["inputs"][idx[index]], "targets": arrays["targets"][idx[index]],
          "mask": mask[index]}


def replay(state, arrays, *, seed, batch_size, num_steps, drop_remainder=False):
  """fit's first ``num_steps`` steps written as a plain loop of ``train_step``:
  the documented keys (shuffle by epoch, dropout by step), nothing compiled
  beyond one jitted step. Returns the state after each step."""
  steps_per_epoch = data.num_batches(len(arrays["targets"]), batch_size, drop_remainder)
  states = []
  for i in range(num_steps):
    batch = epoch_batch(arrays, seed, i // steps_per_epoch, i % steps_per_epoch, batch_size,
                        drop_remainder)
    state, _ = _step(state, batch, key_for(jax.random.key(seed), "dropout", state.step))
    states.append(state)
  return states


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_history_and_params():
  a = base_run(seed=0)
  b, _ = train(seed=0, **BASE)
  assert len(a.history["epoch"]["epoch"]) == 3 and len(a.history["step"]["loss"]) == 21
  assert columns_equal(epoch_rows(a.history), epoch_rows(b.history))
  assert columns_equal(a.history["step"], b.history["step"])
  assert tree_equal(a.state.params, b.state.params)
  assert tree_equal(a.state.opt_state, b.state.opt_state)


def test_different_seed_gives_different_history_and_params():
  a, c = base_run(seed=0), base_run(seed=1)
  assert a.history["step"]["step"] == c.history["step"]["step"]
  assert not np.allclose(a.history["step"]["loss"], c.history["step"]["loss"])
  assert not np.allclose(a.history["epoch"]["train_loss"], c.history["epoch"]["train_loss"])
  assert not tree_allclose(a.state.params, c.state.params)


def test_fit_matches_a_hand_written_loop_of_train_step():
  """The documented keys: shuffle from (seed, epoch), dropout from (seed, step)."""
  result = base_run(seed=0)
  states = replay(new_state(), TRAIN, seed=0, batch_size=8, num_steps=21)
  assert int(result.state.step) == int(states[-1].step) == 21
  assert tree_allclose(result.state.params, states[-1].params, rtol=1e-5, atol=1e-6)


def _run_files(tmp_path, name, seed):
  workdir = tmp_path / name
  jaxtrain_run(workdir, seed)
  with open(workdir / "metrics.csv", newline="") as f:
    table = list(csv.reader(f))
  header, rows = table[0], table[1:]
  assert header == list(COLUMNS)
  seconds = header.index("seconds")
  without_seconds = [[cell for i, cell in enumerate(row) if i != seconds] for row in rows]
  return without_seconds, (workdir / "steps.jsonl").read_bytes()


def jaxtrain_run(workdir, seed):
  from jaxtrain.rundir.run import run

  config = FitConfig(epochs=2, batch_size=8, eval_batch_size=16, seed=seed, progress=False,
                     histogram_every=0)
  run(new_state(), TRAIN, config=config, workdir=workdir, record={"seed": seed}, val=VAL)


def test_run_directory_files_are_reproducible(tmp_path):
  rows_a, steps_a = _run_files(tmp_path, "a", seed=0)
  rows_b, steps_b = _run_files(tmp_path, "b", seed=0)
  rows_c, steps_c = _run_files(tmp_path, "c", seed=1)
  assert [row[0] for row in rows_a] == ["1", "2"]
  assert len(steps_a.splitlines()) == 14
  assert rows_a == rows_b  # every column but seconds, as text: byte-identical
  assert steps_a == steps_b
  assert rows_a != rows_c
  assert steps_a != steps_c
  # The files hold what fit computed, in full precision.
  first = json.loads(steps_a.splitlines()[0])
  assert first["step"] == 1 and math.isfinite(first["loss"])


# --------------------------------------------------------------- early stopping


def scan_best(values, rule):
  best = Best()
  for epoch, value in enumerate(values, start=1):
    best = best.update(value, epoch, rule)
  return best


def test_best_tracks_the_minimum_and_counts_bad_epochs():
  rule = EarlyStopping(patience=2)
  best = scan_best([3.0, 2.0], rule)
  assert (best.epoch, best.value, best.bad_epochs) == (2, 2.0, 0)
  assert not best.should_stop(rule)
  best = scan_best([3.0, 2.0, 2.5], rule)
  assert (best.epoch, best.bad_epochs) == (2, 1) and not best.should_stop(rule)
  best = scan_best([3.0, 2.0, 2.5, 2.1], rule)
  assert (best.epoch, best.bad_epochs) == (2, 2) and best.should_stop(rule)
  # An improvement resets the count.
  best = scan_best([3.0, 2.0, 2.5, 1.0], rule)
  assert (best.epoch, best.value, best.bad_epochs) == (4, 1.0, 0)


def test_best_ties_keep_the_earliest_epoch():
  rule = EarlyStopping(patience=3)
  best = scan_best([2.0, 1.0, 1.0, 1.0], rule)
  assert (best.epoch, best.value, best.bad_epochs) == (2, 1.0, 2)
  best = scan_best([1.0, 1.0, 1.0, 1.0], rule)
  assert (best.epoch, best.bad_epochs) == (1, 3) and best.should_stop(rule)


def test_best_min_delta_needs_strictly_more_than_delta():
  rule = EarlyStopping(patience=5, min_delta=0.25)  # exactly representable values
  best = scan_best([1.0, 0.75], rule)  # improves by exactly min_delta: not enough
  assert (best.epoch, best.value, best.bad_epochs) == (1, 1.0, 1)
  best = scan_best([1.0, 0.75, 0.5], rule)  # 0.5 below the best (1.0) by > 0.25
  assert (best.epoch, best.value, best.bad_epochs) == (3, 0.5, 0)


def test_best_mode_max():
  rule = EarlyStopping(monitor="val_accuracy", mode="max", patience=2)
  best = scan_best([0.5, 0.75, 0.75, 0.25], rule)
  assert (best.epoch, best.value, best.bad_epochs) == (2, 0.75, 2)
  assert best.should_stop(rule)
  best = scan_best([0.5, 0.25, 0.9], rule)
  assert (best.epoch, best.value, best.bad_epochs) == (3, 0.9, 0)


def test_best_nan_is_never_an_improvement():
  rule = EarlyStopping(patience=2)
  best = scan_best([1.0, math.nan, math.nan], rule)
  assert (best.epoch, best.value, best.bad_epochs) == (1, 1.0, 2)
  assert best.should_stop(rule)
  assert not scan_best([1.0, 2.0, 3.0], None).should_stop(None)


@pytest.mark.parametrize("kwargs", [dict(patience=0), dict(mode="avg"), dict(min_delta=-1.0),
                                    dict(min_delta=math.nan)])
def test_early_stopping_rejects_bad_settings(kwargs):
  (name, value), = kwargs.items()
  with pytest.raises(ValueError, match=name):
    EarlyStopping(**kwargs)


# Binary task; the validation set is the training set with every label flipped, so
# the better the model fits the training set the worse its validation loss.
_x = np.random.default_rng(5).normal(size=(40, 2)).astype(np.float32)
ES_TRAIN = {"inputs": _x, "targets": (_x[:, 0] + _x[:, 1] > 0).astype(np.int32)}
ES_VAL = {"inputs": _x, "targets": 1 - ES_TRAIN["targets"]}
ES_MLP = models.MLP(hidden_sizes=(8,), outputs=2)
ES_CONFIG = dict(batch_size=16, seed=3)  # 3 steps per epoch, the last one of 8 rows
PATIENCE = 3


def es_run(restore_best):
  rule = EarlyStopping(patience=PATIENCE, restore_best=restore_best)
  return _once(("es", restore_best), lambda: train(
      ES_MLP, train=ES_TRAIN, val=ES_VAL, epochs=30, early_stopping=rule, **ES_CONFIG))


def plain_es_run(epochs):
  return _once(("es_plain", epochs), lambda: train(
      ES_MLP, train=ES_TRAIN, val=ES_VAL, epochs=epochs, **ES_CONFIG)[0])


def test_early_stopping_stops_at_best_plus_patience():
  result, messages = es_run(restore_best=True)
  val_loss = result.history["epoch"]["val_loss"]
  best = result.best.epoch
  # The data at work: the validation loss is lowest after epoch 1 and rises after.
  assert best == 1
  assert np.all(np.diff(val_loss) > 0)
  # The best epoch is the (earliest) minimum of the logged curve.
  assert best == int(np.argmin(val_loss)) + 1
  assert result.best.value == val_loss[best - 1]
  stop = best + PATIENCE
  assert result.history["epoch"]["epoch"] == list(range(1, stop + 1))
  assert len(result.history["step"]["loss"]) == 3 * stop
  assert result.stop_reason is not None
  assert "early stopping" in result.stop_reason
  assert re.search(rf"after epoch {stop}\b", result.stop_reason)
  assert re.search(rf"best epoch {best}\b", result.stop_reason)
  assert any(result.stop_reason in m for m in messages)


def test_early_stopping_restores_the_best_epochs_params_bitwise():
  result, _ = es_run(restore_best=True)
  reference = plain_es_run(result.best.epoch)
  assert tree_equal(result.state.params, reference.state.params)
  last = plain_es_run(result.best.epoch + PATIENCE)
  assert not tree_allclose(result.state.params, last.state.params)


def test_early_stopping_without_restore_returns_the_last_epochs_params():
  result, _ = es_run(restore_best=False)
  restored, _ = es_run(restore_best=True)
  assert result.best == restored.best
  stop = result.best.epoch + PATIENCE
  assert result.history["epoch"]["epoch"] == list(range(1, stop + 1))
  assert tree_equal(result.state.params, plain_es_run(stop).state.params)


# ------------------------------------------------------------------ aggregation


def test_epoch_losses_are_exact_means_over_ragged_batches():
  result = base_run(seed=0)
  row = {k: v[-1] for k, v in result.history["epoch"].items()}  # the final state's epoch
  for split, arrays in (("train", TRAIN), ("val", VAL)):
    exact = direct_metrics(result.state, arrays)
    # The wrong answer this guards against: the mean of the (ragged) batch means.
    logits = result.state.apply_fn({"params": result.state.params}, arrays["inputs"],
                                   train=False)
    per_example = np.asarray(losses.cross_entropy(logits, arrays["targets"]), np.float64)
    batch_means = np.mean([c.mean() for c in np.split(per_example,
                                                      range(16, len(per_example), 16))])
    assert abs(batch_means - exact["loss"]) > 1e-4  # the test can tell them apart
    assert row[f"{split}_loss"] == pytest.approx(exact["loss"], rel=1e-5)
    assert row[f"{split}_accuracy"] == pytest.approx(exact["accuracy"], abs=1e-6)


def test_train_loss_running_is_the_mean_of_the_epochs_step_losses():
  result = base_run(seed=0)
  steps = result.history["step"]
  assert steps["step"] == list(range(1, 22))
  # The ragged last batch of each epoch holds the 2 leftover rows.
  assert np.asarray(steps["count"]).reshape(3, 7)[:, -1].tolist() == [2.0, 2.0, 2.0]
  losses_by_epoch = np.asarray(steps["loss"], np.float64).reshape(3, 7)
  running = result.history["epoch"]["train_loss_running"]
  assert running == pytest.approx(losses_by_epoch.mean(axis=1).tolist(), rel=1e-6)
  assert result.history["epoch"]["step"] == [7, 14, 21]
  assert result.history["epoch"]["learning_rate"] == pytest.approx([0.1] * 3)


# -------------------------------------------------------------------- NaN guard

# Rows 0-9 of a clean set; row BAD holds an inf. With batch 4 and drop_remainder
# an epoch is 2 steps and leaves 2 rows out, so a seed can be chosen whose first
# epoch leaves the bad row out and whose second epoch has it in its first batch:
# step 3 is the first non-finite step and the state before it is the state after
# epoch 1, which a 1-epoch run gives bitwise.
BAD = 5
NAN_TRAIN = learnable(10, seed=7)
NAN_TRAIN["inputs"][BAD, 0] = np.inf
NAN_CONFIG = dict(batch_size=4, drop_remainder=True, evaluate_train=False)


def _nan_seed() -> int:
  def batches(seed, epoch):
    idx, _ = data.epoch_indices(key_for(jax.random.key(seed), "shuffle", epoch), 10, 4, True)
    return np.asarray(idx)

  for seed in range(1000):
    if BAD not in batches(seed, 0) and BAD in batches(seed, 1)[0]:
      return seed
  raise AssertionError("no seed puts the bad row first in epoch 2")


def nan_run(**config):
  seed = _once("nan_seed", _nan_seed)
  key = ("nan", tuple(sorted(config.items())))
  return _once(key, lambda: train(PLAIN_MLP, train=NAN_TRAIN, seed=seed, **NAN_CONFIG,
                                  **config))


def test_nonfinite_stop_returns_the_state_before_the_bad_step():
  result, messages = nan_run(epochs=3, nonfinite="stop")
  before, _ = nan_run(epochs=1, nonfinite="stop")
  steps = result.history["step"]
  assert steps["step"] == [1, 2, 3]
  assert steps["finite"] == [True, True, False]
  assert result.stop_reason is not None and re.search(r"\bstep 3\b", result.stop_reason)
  assert any(result.stop_reason in m for m in messages)
  assert result.history["epoch"]["epoch"] == [1]  # epoch 2 never finished
  assert int(result.state.step) == 2
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(result.state.params))
  assert tree_equal((result.state.params, result.state.opt_state),
                    (before.state.params, before.state.opt_state))


def test_nonfinite_skip_drops_the_bad_update_and_goes_on():
  seed = _once("nan_seed", _nan_seed)
  result, _ = nan_run(epochs=2, nonfinite="skip")
  before, _ = nan_run(epochs=1, nonfinite="stop")
  assert result.stop_reason is None
  assert result.history["step"]["finite"] == [True, True, False, True]
  assert result.history["epoch"]["epoch"] == [1, 2]
  assert int(result.state.step) == 3  # updates applied
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(result.state.params))
  # Steps 1-2 as in the 1-epoch run, step 3 skipped, step 4 (epoch 2, batch 2)
  # applied to the state after step 2.
  expected, _ = _step(before.state, epoch_batch(NAN_TRAIN, seed, 1, 1, 4, True),
                      key_for(jax.random.key(seed), "dropout", before.state.step))
  assert not tree_allclose(result.state.params, before.state.params)
  assert tree_allclose(result.state.params, expected.params, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- execution modes


class _Compiles:
  """Counts XLA compilations.

  JAX records the ``/jax/core/compile/backend_compile_duration`` event once for
  every executable it compiles (it is what ``jax.log_compiles`` logs), whatever
  the cause: a new jit, a retrace for new shapes/dtypes, or a new input
  sharding or committedness without a retrace. Counting it sees every kind of
  recompilation; counting traces of the loss function would miss the last kind.
  """

  def __init__(self):
    self.names: list[str] = []

  def __call__(self, event, duration, **kwargs):
    if event == BACKEND_COMPILE:
      self.names.append(str(kwargs.get("fun_name")))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


class _EpochMarks(RunMonitor):
  """A RunMonitor noting how many compilations happened by each epoch's row."""

  def __init__(self, workdir, compiles: _Compiles, epochs: int):
    super().__init__(workdir, columns=COLUMNS, total_steps=7 * epochs, steps_per_epoch=7,
                     progress=False)
    self.compiles, self.marks = compiles, []

  def log_epoch(self, row):
    super().log_epoch(row)
    self.marks.append(len(self.compiles.names))


def chunked_run(tmp_path_factory):
  """3 epochs, steps_per_call=3 over 7 steps: calls of 3, 3 and 1 steps, the last
  batch ragged; the compilations counted, and noted at each epoch's row."""
  def go():
    workdir = tmp_path_factory.mktemp("chunked")
    # Compiled programs are shared across fit calls: start from none, so the
    # counter sees this run's compilations.
    jaxtrain.engine.programs._compiled.cache_clear()
    jax.clear_caches()
    with _Compiles() as compiles, _EpochMarks(workdir, compiles, 3) as monitor:
      result, _ = train(epochs=3, batch_size=8, eval_batch_size=16, steps_per_call=3,
                        monitor=monitor)
    return result, list(compiles.names), monitor.marks
  return _once("chunked", go)


def test_later_epochs_compile_nothing(tmp_path_factory):
  """A 3-epoch run compiles no more than a 1-epoch run: everything it compiles
  is compiled by the end of epoch 1 (whose work is all a 1-epoch run does)."""
  result, names, marks = chunked_run(tmp_path_factory)
  assert len(result.history["epoch"]["epoch"]) == 3
  # The counter works: it saw the train programs (3 steps, 1 step) and the evaluation.
  assert len(names) >= 3, names
  assert marks == [len(names)] * 3, (marks, names)


def test_step_scan_and_chunked_execution_agree(tmp_path_factory):
  scan = base_run(seed=0)
  step, _ = _once("step", lambda: train(execution="step", **BASE))
  chunked, _, _ = chunked_run(tmp_path_factory)
  for other in (step, chunked):
    assert columns_allclose(epoch_rows(scan.history), epoch_rows(other.history),
                            rtol=1e-6, atol=1e-7)
    assert columns_allclose(scan.history["step"], other.history["step"], rtol=1e-6, atol=1e-7)
    assert tree_allclose(scan.state.params, other.state.params, rtol=1e-6, atol=1e-7)


def test_step_scan_and_chunked_execution_are_bitwise_equal(tmp_path_factory):
  """The program's claim (K = 1 and K = an epoch give the same run, which makes
  a mid-epoch resume exact), checked bit for bit on this backend."""
  scan = base_run(seed=0)
  step, _ = _once("step", lambda: train(execution="step", **BASE))
  chunked, _, _ = chunked_run(tmp_path_factory)
  for other in (step, chunked):
    assert columns_equal(scan.history["step"], other.history["step"])
    assert columns_equal(epoch_rows(scan.history), epoch_rows(other.history))
    assert tree_equal(scan.state.params, other.state.params)


def test_four_devices_equal_one():
  # No dropout: each device folds its index into the dropout key, so dropout
  # masks (and only they) differ between device counts.
  one, _ = train(PLAIN_MLP, devices=1, **BASE)
  four, _ = train(PLAIN_MLP, devices=4, **BASE)
  assert columns_allclose(epoch_rows(one.history), epoch_rows(four.history),
                          rtol=1e-5, atol=1e-6)
  assert columns_allclose(one.history["step"], four.history["step"], rtol=1e-5, atol=1e-6)
  assert tree_allclose(one.state.params, four.state.params, rtol=1e-5, atol=1e-6)
  assert not tree_allclose(one.state.params, new_state(PLAIN_MLP).params)


@pytest.mark.parametrize("devices", [1, 4])
def test_the_callers_state_survives_fit_on_any_device_count(devices):
  """fit donates its own copy: replicating to 4 devices, device_put would hand
  it the caller's buffer on device 0 (and the caller's state be deleted)."""
  state = new_state(PLAIN_MLP)
  before = jax.tree.map(np.asarray, state.params)
  train(PLAIN_MLP, state=state, devices=devices, epochs=1, batch_size=8)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
  assert tree_equal(jax.tree.map(np.asarray, state.params), before)


def test_eval_every_steps_matches_direct_evaluation():
  result, _ = train(PLAIN_MLP, epochs=2, batch_size=8, eval_batch_size=16, eval_every_steps=3)
  steps = result.history["step"]
  assert steps["step"] == list(range(1, 15))
  states = replay(new_state(PLAIN_MLP), TRAIN, seed=0, batch_size=8, num_steps=14)
  evaluated = [s for s in steps["step"] if s % 3 == 0]
  assert evaluated == [3, 6, 9, 12]  # across the epoch boundary (7)
  for split, arrays in (("train", TRAIN), ("val", VAL)):
    for metric in ("loss", "accuracy"):
      column = np.asarray(steps[f"{split}_{metric}"], np.float64)
      assert np.isnan(np.delete(column, np.asarray(evaluated) - 1)).all()
      for s in evaluated:
        expected = direct_metrics(states[s - 1], arrays)[metric]
        assert column[s - 1] == pytest.approx(expected, rel=1e-5, abs=1e-6), (split, metric, s)


# ------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("config, name, value", [
    (dict(epochs=0), "epochs", "0"),
    (dict(epochs=-1), "epochs", "-1"),
    (dict(epochs=1.5), "epochs", "1.5"),
    (dict(batch_size=0), "batch_size", "0"),
    (dict(batch_size=51), "batch_size", "51"),
    (dict(devices=0), "devices", "0"),
    (dict(devices=5), "devices", "5"),
    (dict(devices=4, batch_size=6), "batch_size", "6"),
    (dict(execution="bogus"), "execution", "'bogus'"),
    (dict(nonfinite="ignore"), "nonfinite", "'ignore'"),
    (dict(steps_per_call=-1), "steps_per_call", "-1"),
])
def test_bad_fit_arguments_raise_value_error_naming_them(config, name, value):
  config = {"epochs": 1, "batch_size": 8, **config}
  with pytest.raises(ValueError) as error:
    jaxtrain.fit(new_state(), TRAIN, val=VAL, config=FitConfig(progress=False, **config))
  message = str(error.value)
  assert re.search(rf"\b{name}\b", message), message
  assert re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.])", message), message


@pytest.mark.parametrize("monitor", ["val_loss", "val_accuracy"])
def test_early_stopping_on_validation_without_validation_data(monitor):
  rule = EarlyStopping(monitor=monitor, mode="min" if monitor == "val_loss" else "max")
  with pytest.raises(ValueError, match=rf"{monitor}.*validation|validation.*{monitor}"):
    jaxtrain.fit(new_state(), TRAIN, val=None,
                 config=FitConfig(epochs=1, batch_size=8, early_stopping=rule, progress=False))


def test_fit_leaves_the_callers_state_usable():
  state = make_state(PLAIN_MLP, optimizer=("sgd", 0.1), momentum=0.9)
  train(PLAIN_MLP, state=state, epochs=1, batch_size=25)
  # e.g. fitting the same initial state with another config, or evaluating it
  jax.block_until_ready(jax.tree.map(lambda x: x + 0, state))


@pytest.mark.parametrize("monitor, evaluate_train", [("val_acc", True), ("train_loss", False)])
def test_early_stopping_on_a_metric_the_run_does_not_log(monitor, evaluate_train):
  rule = EarlyStopping(monitor=monitor, patience=1)
  with pytest.raises(ValueError, match=monitor):
    train(PLAIN_MLP, epochs=3, batch_size=25, early_stopping=rule,
          evaluate_train=evaluate_train)


def test_early_stopping_with_mid_epoch_checkpoints(tmp_path):
  from jaxtrain.rundir.checkpoint import CheckpointConfig
  from jaxtrain.rundir.run import run

  config = FitConfig(epochs=2, batch_size=8, eval_batch_size=16, progress=False,
                     histogram_every=0, early_stopping=EarlyStopping(patience=5))
  result = run(new_state(), TRAIN, config=config, workdir=tmp_path / "run", record={},
               val=VAL, checkpoint=CheckpointConfig(every_steps=3, async_save=False))
  assert result.history["epoch"]["epoch"] == [1, 2]


def test_fit_on_a_trained_state_continues_the_same_run():
  """fit to epoch 1, then fit of its state to epoch 3 == fit to epoch 3, bit for
  bit (it used to restart at epoch 0: the same shuffle again, steps from 1)."""
  rest_of_base = {k: v for k, v in BASE.items() if k != "epochs"}
  once, _ = train(epochs=3, **rest_of_base)
  first, _ = train(epochs=1, **rest_of_base)
  rest, _ = train(state=first.state, epochs=3, **rest_of_base)
  assert tree_equal(rest.state.params, once.state.params)
  assert int(rest.state.step) == int(once.state.step)
  assert rest.history["epoch"]["epoch"] == [2, 3]
  assert columns_equal({k: v[1:] for k, v in epoch_rows(once.history).items()},
                       epoch_rows(rest.history))
  cut = len(first.history["step"]["step"])
  assert columns_equal({k: v[cut:] for k, v in once.history["step"].items()},
                       rest.history["step"])
  # A state already at the end trains nothing more.
  done, _ = train(state=rest.state, epochs=3, **rest_of_base)
  assert tree_equal(done.state.params, rest.state.params) and done.history["step"] == {}


@pytest.mark.parametrize("axis_name", [None, jaxtrain.parallel.AXIS])
def test_per_device_batch_norm_on_several_devices_warns_naming_the_layer(axis_name):
  """FitConfig(devices=4) with a batch-norm model that is not cross-replica used
  to train on per-device statistics silently."""
  model = models.MLP(hidden_sizes=(8,), outputs=3, batch_norm=True, axis_name=axis_name)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(model, epochs=1, batch_size=8, devices=4)
  messages = [str(w.message) for w in caught if "batch norm" in str(w.message)]
  if axis_name is None:
    assert len(messages) == 1 and "BatchNorm_0" in messages[0] and "axis_name" in messages[0]
  else:
    assert messages == []


def test_a_signal_at_the_run_s_last_boundary_is_no_interruption():
  """A stop request seen where the run ends anyway: the run is complete (test
  set evaluated, no "run the same command to resume")."""
  polls = []

  def should_stop():
    polls.append(1)
    return "SIGTERM" if len(polls) == 3 else None  # poll 1: before training

  messages = []
  result = jaxtrain.fit(new_state(), TRAIN, val=VAL, test=VAL, log=messages.append,
                        should_stop=should_stop,
                        config=FitConfig(epochs=2, batch_size=8, steps_per_call=7,
                                         progress=False, histogram_every=0))
  assert len(polls) == 3 and result.stop_reason is None and result.test is not None
  assert not any("SIGTERM" in m for m in messages)


def test_epoch_seconds_add_up_to_the_training_time(monkeypatch):
  """Calls overlap (one is queued while the host logs the last), and each epoch
  was charged from its call's dispatch: the seconds column summed to ~1.9x the
  run's time. With a clock that ticks once per reading, the sum is exactly the
  time from the first dispatch to the last fetch."""
  import jaxtrain.train.driver as driver
  import jaxtrain.train.fit as fit_module

  readings = []

  class Clock:
    @staticmethod
    def perf_counter():
      readings.append(float(len(readings)))
      return readings[-1]

  monkeypatch.setattr(fit_module, "time", Clock)  # dispatches
  monkeypatch.setattr(driver, "time", Clock)  # fetches
  result, _ = train(epochs=6, batch_size=8, eval_batch_size=16, steps_per_call=7)
  seconds = result.history["epoch"]["seconds"]
  assert len(seconds) == 6 and all(s > 0 for s in seconds)
  # Readings alternate dispatch (start) and fetch (end); the first is a dispatch.
  assert sum(seconds) == pytest.approx(readings[-1] - readings[0])


@pytest.mark.parametrize("devices", [1, 4])
def test_accumulating_micro_batches_equals_one_large_batch(devices):
  """accumulate_steps=4 of batch 8 == batch 32 for a model without batch norm:
  the same updates (allclose), the same step count, schedules and rows in updates."""
  large, _ = train(PLAIN_MLP, epochs=3, batch_size=32, eval_batch_size=16, devices=devices)
  small, _ = train(PLAIN_MLP, epochs=3, batch_size=8, accumulate_steps=4, eval_batch_size=16,
                   devices=devices)
  assert int(small.state.step) == int(large.state.step)
  assert small.history["step"]["step"] == large.history["step"]["step"]
  assert tree_allclose(small.state.params, large.state.params, rtol=1e-5, atol=1e-6)
  assert columns_allclose(epoch_rows(small.history), epoch_rows(large.history),
                          rtol=1e-5, atol=1e-6)
  assert columns_allclose(small.history["step"], large.history["step"], rtol=1e-5, atol=1e-6)


def test_accumulate_steps_is_checked():
  with pytest.raises(ValueError, match="accumulate_steps must be an integer >= 1, got 0"):
    train(PLAIN_MLP, epochs=1, batch_size=8, accumulate_steps=0)
  with pytest.raises(ValueError, match="accumulate_steps times batch_size 8 must not exceed the 50 .*got 100"):
    train(PLAIN_MLP, epochs=1, batch_size=8, accumulate_steps=100)


def _top2(outputs, targets):
  """Per example: is the label among the two largest logits?"""
  top = jnp.argsort(outputs, axis=-1)[:, -2:]
  return {"top2": jnp.any(top == targets[:, None], axis=-1)}


def test_a_custom_metric_is_aggregated_like_the_loss_and_logged(tmp_path):
  """metrics_fn's top-2 accuracy: the batch mean in every step's record, exact
  sums over the epoch sets (padding rows left out) in the rows, metrics.csv and
  summarize; it used to have no way in, and summarize dropped unknown sums."""
  from jaxtrain.rundir.run import run

  model = models.MLP(hidden_sizes=(8,), outputs=3)
  state = jaxtrain.create_train_state(model, jaxtrain.make_optimizer("sgd", 0.1),
                                      jax.random.key(0), TRAIN["inputs"][:1],
                                      loss_fn=losses.cross_entropy, metrics_fn=_top2)
  config = FitConfig(epochs=2, batch_size=8, eval_batch_size=16, progress=False,
                     histogram_every=0)
  result = run(state, TRAIN, val=VAL, config=config, workdir=tmp_path / "run",
               record={"test": "top2"}, checkpoint=None)
  final = result.state

  def by_hand(arrays):
    logits = final.apply_fn(final.variables, arrays["inputs"], train=False)
    top = np.argsort(np.asarray(logits), axis=-1)[:, -2:]
    return float(np.mean(np.any(top == arrays["targets"][:, None], axis=-1)))

  rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
  assert float(rows[-1]["val_top2"]) == pytest.approx(by_hand(VAL), abs=1e-6)
  assert float(rows[-1]["train_top2"]) == pytest.approx(by_hand(TRAIN), abs=1e-6)
  assert by_hand(VAL) != pytest.approx(float(rows[-1]["val_accuracy"]))  # a different metric
  steps = [json.loads(line) for line in open(tmp_path / "run" / "steps.jsonl")]
  assert all(0.0 <= s["top2"] <= 1.0 for s in steps) and len(steps) == 14
  batches = [jax.jit(jaxtrain.eval_step)(final, b) for b in jaxtrain.data.batches(VAL, 8)]
  assert jaxtrain.summarize(batches)["top2"] == pytest.approx(by_hand(VAL), abs=1e-6)


@pytest.mark.parametrize("metrics_fn,message", [
    (lambda o, t: {"loss": t * 0.0}, "must be an identifier other than loss"),
    (lambda o, t: {"x": o}, r"must have shape \(\d+,\) \(one value per example\)"),
    (lambda o, t: [t], "must return a dict")])
def test_bad_custom_metrics_are_named(metrics_fn, message):
  state = jaxtrain.create_train_state(PLAIN_MLP, jaxtrain.make_optimizer("sgd", 0.1),
                                      jax.random.key(0), TRAIN["inputs"][:1],
                                      loss_fn=losses.cross_entropy, metrics_fn=metrics_fn)
  with pytest.raises(ValueError, match=message):
    train(state=state, epochs=1, batch_size=8)


def test_straight_line_metrics_keep_their_names_across_setups():
  """One compiled straight-line program serves runs whose metrics differ (the
  evaluated sets): each run's steps come back under their own names."""
  train, val = moons_split(n_samples=120, n_train=96)
  state = make_state(models.MLP(hidden_sizes=(8,), outputs=2), inputs_shape=(1, 2))

  def run(evaluate_train):
    config = jaxtrain.FitConfig(epochs=1, batch_size=32, execution="step", eval_every_steps=1,
                                evaluate_train=evaluate_train, progress=False)
    return jaxtrain.fit(state, train, val=val, config=config, log=lambda _: None).history["step"]
  first, other, again = run(True), run(False), run(True)
  assert "train_loss" in first and "train_loss" not in other
  assert again.keys() == first.keys()
  assert columns_equal(again, first)
