"""Flax NNX models as first-class models: the tutorial's CNN pasted unchanged
(tests/published.py) and small NNX modules through every path of jaxtrain."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxtrain
from jaxtrain import losses, many
from jaxtrain.engine import parallel
from tests import published
from tests.helpers import tree_allclose, tree_equal

QUIET = dict(progress=False, histogram_every=0)


class Net(nnx.Module):
  """Dropout and cross-device batch norm, as an NNX user writes them."""

  def __init__(self, *, axis_name=None, rate=0.3, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, axis_name=axis_name, rngs=rngs)
    self.dropout = nnx.Dropout(rate, rngs=rngs)
    self.linear2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.linear2(self.dropout(nnx.relu(self.norm(self.linear1(x)))))


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  return {"inputs": x, "targets": np.argmax(x[:, :3], 1).astype(np.int32)}


def _state(model=None, tx=None, **kwargs):
  model = model if model is not None else Net(rngs=nnx.Rngs(0))
  return jaxtrain.create_train_state(model, tx or optax.sgd(0.1, momentum=0.9),
                                     jax.random.key(0), _data()["inputs"][:1],
                                     loss_fn=losses.cross_entropy, **kwargs)


def _fit(state, epochs=3, **config):
  data = _data()
  return jaxtrain.fit(state, data, val=data, log=lambda _: None,
                      config=jaxtrain.FitConfig(epochs=epochs, batch_size=16, **QUIET,
                                                **config))


def test_the_nnx_mnist_tutorial_cnn_reaches_97_percent_through_fit(mnist_path):
  """docs_nnx/mnist_tutorial.md's CNN and optimizer (adamw 0.005, 0.9; batch 32,
  the incomplete last batch dropped) as published, on the 6000 local images."""
  data = jaxtrain.data.load_mnist(mnist_path, splits=("train", "test"))
  train, test = ({"inputs": jaxtrain.data.normalize_images(d["inputs"]),
                  "targets": d["targets"]} for d in (data["train"], data["test"]))
  model = published.CNN(rngs=nnx.Rngs(0))
  state = jaxtrain.create_train_state(model, optax.adamw(0.005, 0.9), jax.random.key(0),
                                      train["inputs"][:1], loss_fn=losses.cross_entropy)
  assert state.takes_train is False and set(state.batch_stats) == {"batch_norm1", "batch_norm2"}
  for epochs in range(1, 11):  # continuing a state equals one fit to that epoch
    config = jaxtrain.FitConfig(epochs=epochs, batch_size=32, drop_remainder=True,
                                evaluate_train=False, **QUIET)
    result = jaxtrain.fit(state, train, test=test, log=lambda _: None, config=config)
    state = result.state
    if result.test["accuracy"] >= 0.97:
      break
  assert result.test["accuracy"] >= 0.97, (epochs, result.test)
  # The user's module was never touched: its parameters are still the initial ones.
  assert not np.array_equal(np.asarray(model.linear2.kernel[...]),
                            np.asarray(state.params["linear2"]["kernel"]))
  assert model.batch_norm1.use_running_average is False
  # The way back: an ordinary nnx.Module with the trained variables.
  trained = jaxtrain.to_module(state)
  trained.eval()
  np.testing.assert_allclose(trained(test["inputs"][:64]),
                             jaxtrain.predict(state, test["inputs"][:64]), rtol=1e-4, atol=1e-4)


def test_same_seed_same_bits_another_seed_other_bits():
  a, b, other = (_fit(_state(), seed=s).state for s in (0, 0, 1))
  assert tree_equal(a.params, b.params) and tree_equal(a.batch_stats, b.batch_stats)
  assert not tree_equal(a.params, other.params)


def test_fit_to_one_then_to_three_equals_fit_to_three():
  once = _fit(_state(), epochs=3).state
  first = _fit(_state(), epochs=1).state
  assert tree_equal(_fit(first, epochs=3).state.params, once.params)


def test_dropout_follows_the_step_key_and_evaluation_is_deterministic():
  state, batch = _state(), {k: v[:16] for k, v in _data().items()}
  step = jax.jit(jaxtrain.train_step)
  one, two, other = (step(state, batch, jax.random.key(k))[0] for k in (1, 1, 2))
  assert tree_equal(one.params, two.params) and not tree_equal(one.params, other.params)
  evaluate = jax.jit(jaxtrain.eval_step)
  assert float(evaluate(one, batch)["loss"]) == float(evaluate(one, batch)["loss"])
  # Batch statistics move in training steps (evaluation returns no state).
  assert not tree_equal(one.batch_stats, state.batch_stats)
  np.testing.assert_array_equal(jaxtrain.predict(one, batch["inputs"]),
                                jaxtrain.predict(one, batch["inputs"]))


def test_four_devices_with_cross_device_batch_norm_equal_one():
  # Each device draws its own dropout masks (its index folded into the key), so
  # the runs compare without dropout, as the Linen models' tests do.
  states = [_state(Net(axis_name=parallel.AXIS, rate=0.0, rngs=nnx.Rngs(0)))
            for _ in range(2)]
  one = _fit(states[0], epochs=2, devices=1).state
  four = _fit(states[1], epochs=2, devices=4).state
  assert tree_allclose(one.params, four.params, atol=1e-5)
  assert tree_allclose(one.batch_stats, four.batch_stats, atol=1e-5)


def test_pmap_shard_map_and_sharded_jit_steps_equal_jit():
  # Without dropout (each device draws its own masks) every path is one computation.
  state = _state(Net(axis_name=parallel.AXIS, rate=0.0, rngs=nnx.Rngs(0)))
  batch = {k: v[:16] for k, v in _data().items()}
  key = jax.random.key(3)
  alone, _ = jax.jit(jaxtrain.train_step)(state, batch, key)
  p_train, _ = parallel.pmap_steps(donate=False)
  s_train, _ = parallel.shard_map_steps(donate=False)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  j_train, _ = parallel.sharded_jit_steps(mesh, donate=False)
  pmapped = parallel.unreplicate(p_train(parallel.replicate(state), parallel.shard_batch(batch),
                                         key)[0])
  for other in (pmapped, s_train(state, batch, key)[0], j_train(state, batch, key)[0]):
    assert tree_allclose(other.params, alone.params, atol=1e-6)
    assert tree_allclose(other.batch_stats, alone.batch_stats, atol=1e-6)


def test_mc_dropout_draws_masks_and_the_mean_is_reproducible():
  state = _fit(_state(), epochs=1).state
  x = _data()["inputs"][:8]
  p = jaxtrain.predict(state, x, key=jax.random.key(1), mc_samples=16)
  q = jaxtrain.predict(state, x, key=jax.random.key(1), mc_samples=16)
  assert p.mean.shape == (8, 3) and bool((p.variance > 0).all())
  np.testing.assert_array_equal(p.mean, q.mean)


def test_vmapped_seeds_equal_separate_runs():
  data, seeds = _data(), [0, 1, 2]
  config = jaxtrain.FitConfig(epochs=2, batch_size=16, **QUIET)
  tx = optax.sgd(0.1, momentum=0.9)  # one optimizer: the members' states stack
  states = [_state(Net(rngs=nnx.Rngs(s)), tx) for s in seeds]
  together = many.fit_many(many.stack(states), data, val=data, seeds=seeds, config=config)
  for m, (s, state) in enumerate(zip(seeds, states, strict=True)):
    alone = jaxtrain.fit(state, data, val=data, log=lambda _: None,
                         config=jaxtrain.FitConfig(epochs=2, batch_size=16, seed=s, **QUIET))
    assert tree_allclose(many.unstack(together.state, m).params, alone.state.params,
                         atol=1e-5)


def test_bf16_trains_finite_with_float32_master_weights():
  state = _state(precision="bf16")
  result = _fit(state, epochs=2)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(result.state.params))
  assert np.isfinite(result.history["epoch"]["val_loss"]).all()


def test_checkpoint_save_and_load_like_round_trip_bitwise(tmp_path):
  state = _fit(_state(tx=optax.adam(1e-2)), epochs=1).state
  jaxtrain.checkpoint.save(tmp_path, state)
  loaded = jaxtrain.checkpoint.load(tmp_path, like=_state(tx=optax.adam(1e-2)))
  assert tree_equal(jaxtrain.core.state.state_arrays(loaded),
                    jaxtrain.core.state.state_arrays(state))


def test_histograms_activations_and_ema_cover_nnx_models():
  from jaxtrain.core.activations import activations

  state = _state(ema_decay=0.9)
  found = activations(state, _data()["inputs"][:4])
  assert set(found) >= {"linear1", "norm", "dropout", "linear2", "output"}
  np.testing.assert_allclose(found["output"], jaxtrain.predict(state, _data()["inputs"][:4]),
                             rtol=1e-6)
  result = _fit(state, epochs=2)
  assert "val_ema_loss" in result.history["epoch"]


def test_the_users_module_is_never_mutated_nor_shares_buffers():
  net = Net(rngs=nnx.Rngs(0))

  def snapshot():  # every variable, the Rngs' keys and counters included
    return jax.tree.map(lambda a: np.array(jax.random.key_data(a) if jnp.issubdtype(
        a.dtype, jax.dtypes.prng_key) else a), nnx.to_pure_dict(nnx.state(net)))

  before = snapshot()
  state = _state(net)
  step = jax.jit(jaxtrain.train_step, donate_argnums=0)  # deletes the state's buffers
  batch = {k: v[:16] for k, v in _data().items()}
  trained, _ = step(state, batch, jax.random.key(1))
  module = jaxtrain.to_module(trained)
  module.train()
  module(batch["inputs"])  # draws from its own Rngs: its counters move, not the user's
  assert tree_equal(before, snapshot())
  net(batch["inputs"])  # the user's module still runs (no donated buffer)


def test_the_nnx_cnn_started_from_the_linen_one_trains_to_its_numbers():
  from jaxtrain.nn import nnx_models

  rng = np.random.default_rng(0)
  x = rng.random((64, 12, 12, 1)).astype(np.float32)
  data = {"inputs": x, "targets": (np.arange(64) % 10).astype(np.int32)}
  linen = jaxtrain.models.CNN(features=(4, 8), dense=16)
  tx = optax.adamw(1e-3)
  config = jaxtrain.FitConfig(epochs=2, batch_size=16, **QUIET)
  a = jaxtrain.create_train_state(linen, tx, jax.random.key(0), x[:1], loss_fn=losses.cross_entropy)
  b = jaxtrain.create_train_state(nnx_models.cnn_from_linen((12, 12, 1), linen, a.variables), tx,
                                  jax.random.key(0), x[:1], loss_fn=losses.cross_entropy)
  ra, rb = (jaxtrain.fit(s, data, val=data, log=lambda _: None, config=config) for s in (a, b))
  np.testing.assert_allclose(ra.history["epoch"]["val_loss"], rb.history["epoch"]["val_loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(ra.state.batch_stats["BatchNorm_1"]["var"],
                             rb.state.batch_stats["norms"][1]["var"], rtol=1e-5)


def test_with_module_and_to_module_are_inverse():
  state = _fit(_state(), epochs=1).state
  module = jaxtrain.to_module(state)
  again = jaxtrain.with_module(_state(), module)
  assert tree_equal(again.params, state.params) and tree_equal(again.batch_stats,
                                                               state.batch_stats)
  with pytest.raises(ValueError, match="differ in structure"):
    jaxtrain.with_module(_state(), nnx.Linear(6, 3, rngs=nnx.Rngs(0)))


class Cached(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(6, 3, rngs=rngs)
    self.calls = nnx.Variable(jnp.zeros(()))

  def __call__(self, x):
    return self.linear(x)


def test_an_unsupported_variable_kind_is_refused_in_one_line():
  with pytest.raises(ValueError) as raised:
    _state(Cached(nnx.Rngs(0)))
  assert "Variable" in str(raised.value) and "'calls'" in str(raised.value)
  assert "\n" not in str(raised.value)


# -- run.run with an NNX model: SIGKILL mid-run, then a rerun ----------------------

def train_into(workdir):
  import dataclasses

  import jaxtrain.rundir.run as jrun
  from jaxtrain.rundir.checkpoint import CheckpointConfig

  data = _data(96)
  config = jaxtrain.FitConfig(epochs=4, batch_size=16, **QUIET)
  record = {"experiment": "test_nnx", "fit": dataclasses.asdict(config)}
  return jrun.run(_state(), data, val=data, config=config, workdir=workdir, record=record,
                  checkpoint=CheckpointConfig(every_steps=4))


CHILD = """
import contextlib, os, pathlib, signal, sys, time
sys.path.insert(0, {repo!r})
import jaxtrain.rundir.run as jrun
from tests import test_nnx as t

workdir = pathlib.Path(sys.argv[1])
polls = []

@contextlib.contextmanager
def fake():
  def should_stop():
    polls.append(1)
    if len(polls) == 4:  # at step 12, mid-epoch 2, once step 8's checkpoint is complete
      while not (workdir / "checkpoints" / "8").is_dir():
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    return None
  yield should_stop

jrun.stop_on_signals = fake
jrun.plot_curves = lambda *a, **k: None
t.train_into(workdir)
"""


def test_sigkill_mid_run_then_rerun_equals_the_uninterrupted_run(tmp_path, monkeypatch):
  import pathlib
  import subprocess
  import sys

  import jaxtrain.rundir.run as jrun
  from tests.helpers import untimed_rows

  monkeypatch.setattr(jrun, "plot_curves", lambda *a, **k: None)
  repo = pathlib.Path(__file__).resolve().parents[1]
  script = tmp_path / "child.py"
  script.write_text(CHILD.format(repo=str(repo)))
  killed = tmp_path / "killed"
  child = subprocess.run([sys.executable, str(script), str(killed)], cwd=repo,
                         capture_output=True, text=True, timeout=300)
  assert child.returncode == -9, child.stderr[-2000:]
  assert max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == 8
  resumed = train_into(killed)
  whole = train_into(tmp_path / "whole")
  assert tree_equal(resumed.state.params, whole.state.params)
  assert tree_equal(resumed.state.batch_stats, whole.state.batch_stats)
  assert untimed_rows(killed) == untimed_rows(tmp_path / "whole")
  assert (killed / "steps.jsonl").read_bytes() == (tmp_path / "whole/steps.jsonl").read_bytes()


@pytest.mark.parametrize("config, state_kwargs", [
    (dict(accumulate_steps=2), {}),
    (dict(reduce_lr_on_plateau=jaxtrain.ReduceLROnPlateau(patience=0, factor=0.5)), {}),
    (dict(early_stopping=jaxtrain.EarlyStopping(patience=1)), {}),
    ({}, dict(regularization=jaxtrain.Regularization(l1=1e-4, l2=1e-3, input_noise=0.1))),
    ({}, dict(precision="fp16")),
], ids=["accumulate", "plateau", "early_stopping", "l1_l2_noise", "fp16"])
def test_fit_options_train_nnx_models(config, state_kwargs):
  tx = jaxtrain.make_optimizer("sgd", 0.1, momentum=0.9)
  result = _fit(_state(tx=tx, **state_kwargs), epochs=3, **config)
  assert np.isfinite(result.history["epoch"]["val_loss"]).all()
  assert result.history["epoch"]["val_loss"][-1] < 1.1  # from ~1.2 at chance


def test_streamed_and_straight_line_runs_equal_the_resident_scanned_one():
  base = _fit(_state(), epochs=2).state
  streamed = _fit(_state(), epochs=2, data="stream").state
  straight = _fit(_state(), epochs=2, execution="step").state
  assert tree_equal(streamed.params, base.params)
  assert tree_allclose(straight.params, base.params, atol=1e-6)


def test_a_run_directory_logs_weight_gradient_and_activation_histograms(tmp_path):
  import dataclasses

  import jaxtrain.rundir.run as jrun

  data = _data()
  config = jaxtrain.FitConfig(epochs=2, batch_size=16, progress=False, histogram_every=1)
  jrun.run(_state(), data, val=data, config=config, workdir=tmp_path,
           record={"experiment": "test_nnx", "fit": dataclasses.asdict(config)})
  from tests.test_monitor import _events

  tags = {value.tag for event in _events(tmp_path) for value in event.summary.value
          if value.HasField("histo")}
  assert {"weights/linear1/kernel", "grads/linear1/kernel",
          "activations/linear1"} <= tags, sorted(tags)


def test_a_new_instance_of_the_tutorial_cnn_reuses_the_compiled_step():
  """Its avg_pool is a functools.partial, new (and unequal) in every instance."""
  tx, x = optax.sgd(0.1), np.zeros((8, 28, 28, 1), np.float32)
  states = [jaxtrain.create_train_state(published.CNN(rngs=nnx.Rngs(seed)), tx,
                                        jax.random.key(0), x[:1], loss_fn=losses.cross_entropy)
            for seed in (0, 1)]
  assert states[0].apply_fn == states[1].apply_fn
  step, batch = jax.jit(jaxtrain.train_step), {"inputs": x, "targets": np.zeros(8, np.int32)}
  step(states[0], batch, jax.random.key(1))
  compiled = step._cache_size()
  step(states[1], batch, jax.random.key(1))
  assert step._cache_size() == compiled
  assert states[0].apply_fn != _state().apply_fn  # a different module stays different
