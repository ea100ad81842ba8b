"""One per-device step under pmap, shard_map and sharded jit, on 4 fake CPU devices."""

import jax
import numpy as np
import pytest

import jaxtrain
from jaxtrain import models, parallel
from tests.helpers import classification_batch, make_state, tree_allclose

KEY = jax.random.key(42)


def run_three_ways(jit_model, par_model, batch, steps=3):
  """The same updates by jit (global batch), pmap and shard_map."""
  state = make_state(jit_model, optimizer=("adam", 1e-2), weight_decay=1e-3)
  par_state = state.replace(apply_fn=par_model.apply)
  keys = [jax.random.fold_in(KEY, i) for i in range(steps)]

  jit_step = jax.jit(jaxtrain.train_step)
  single = state
  for key in keys:
    single, single_metrics = jit_step(single, batch, key)
  single_eval = jax.jit(jaxtrain.eval_step)(single, batch)

  train, evaluate = parallel.pmap_steps(donate=False)
  pstate = parallel.replicate(par_state)
  pbatch = parallel.shard_batch(batch)
  window = parallel.InFlight()  # CPU collectives of queued pmap steps can abort
  for key in keys:
    pstate, pmetrics = train(pstate, pbatch, key)
    window(pmetrics)
  window.drain()
  peval = parallel.unreplicate(evaluate(pstate, pbatch))
  pstate, pmetrics = parallel.unreplicate(pstate), parallel.unreplicate(pmetrics)

  mesh = parallel.local_mesh()
  train, evaluate = parallel.shard_map_steps(mesh, donate=False)
  sstate = parallel.replicate_on_mesh(par_state, mesh)
  sbatch = parallel.shard_batch_on_mesh(batch, mesh)
  for key in keys:
    sstate, smetrics = train(sstate, sbatch, key)
    window(smetrics)
  window.drain()
  seval = evaluate(sstate, sbatch)
  return (single, single_metrics, single_eval), (pstate, pmetrics, peval), (
      sstate, smetrics, seval)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_pmap_equals_shard_map_equals_jit(batch_norm):
  jit_model = models.MLP(hidden_sizes=(16, 16), outputs=3, batch_norm=batch_norm)
  par_model = jit_model.clone(axis_name=parallel.AXIS if batch_norm else None)
  batch = classification_batch(n=16)
  # A ragged global batch: the third device holds one padding row and the
  # last holds nothing but padding (batch norm must weight devices by count).
  batch["mask"] = np.array([1.0] * 11 + [0.0] + [0.0] * 4, np.float32)
  results = run_three_ways(jit_model, par_model, batch)
  (ref_state, ref_metrics, ref_eval) = results[0]
  for state, metrics, evaluation in results[1:]:
    assert tree_allclose(
        (state.params, state.batch_stats, state.opt_state, state.step),
        (ref_state.params, ref_state.batch_stats, ref_state.opt_state, ref_state.step),
        rtol=1e-5, atol=1e-5)
    assert tree_allclose(metrics, ref_metrics, rtol=1e-5, atol=1e-6)
    assert tree_allclose(evaluation, ref_eval, rtol=1e-5, atol=1e-6)
  if batch_norm:
    assert jax.tree.leaves(ref_state.batch_stats)


def test_sharded_jit_equals_single_device():
  model = models.MLP(hidden_sizes=(16,), outputs=3, batch_norm=True)
  state = make_state(model, optimizer=("sgd", 0.1), momentum=0.9)
  batch = classification_batch(n=16)
  mesh = jax.make_mesh((4,), ("data",))
  train, evaluate = parallel.sharded_jit_steps(mesh, donate=False)
  sharded, smetrics = train(parallel.replicate_on_mesh(state, mesh),
                            parallel.shard_batch_on_mesh(batch, mesh), KEY)
  single, metrics = jax.jit(jaxtrain.train_step)(state, batch, KEY)
  assert tree_allclose((sharded.params, sharded.batch_stats), (single.params, single.batch_stats),
                       rtol=1e-5, atol=1e-6)
  assert tree_allclose(smetrics, metrics, rtol=1e-5)
  assert len(sharded.params["Dense_0"]["kernel"].sharding.device_set) == 4


def test_dropout_masks_differ_between_devices():
  model = models.MLP(hidden_sizes=(32,), outputs=3, dropout_rate=0.5)
  state = make_state(model)
  shard = classification_batch(n=2)
  # Every device gets the same rows. Had they all drawn device 0's mask, the
  # global gradient would equal device 0's alone.
  batch = {k: np.concatenate([v] * 4) for k, v in shard.items()}
  train, _ = parallel.pmap_steps(donate=False)
  pstate, _ = train(parallel.replicate(state), parallel.shard_batch(batch), KEY)
  device0, _ = jax.jit(jaxtrain.train_step)(state, shard, jax.random.fold_in(KEY, 0))
  assert not tree_allclose(parallel.unreplicate(pstate).params, device0.params, atol=1e-6)
  device1, _ = jax.jit(jaxtrain.train_step)(state, shard, jax.random.fold_in(KEY, 1))
  assert not tree_allclose(device0.params, device1.params, atol=1e-6)


def test_shard_batch_and_unshard_round_trip():
  batch = classification_batch(n=8)
  sharded = parallel.shard_batch(batch)
  assert sharded["inputs"].shape == (4, 2, 6)
  assert len(sharded["inputs"].sharding.device_set) == 4
  for key, value in parallel.unshard(sharded).items():
    np.testing.assert_array_equal(value, batch[key])


def test_shard_batch_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 4"):
    parallel.shard_batch(classification_batch(n=10))


@pytest.mark.parametrize("n_devices", [2, 4])
@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_200_steps_of_a_large_mlp_complete(n_devices, mode):
  devices = jax.local_devices()[:n_devices]
  model = models.MLP(hidden_sizes=(512, 512), outputs=10)  # many steps in flight, not FLOPs
  state = make_state(model, inputs_shape=(1, 784), optimizer=("sgd", 0.01))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.normal(size=(256, 784)).astype(np.float32),
           "targets": rng.integers(0, 10, 256).astype(np.int32)}
  if mode == "pmap":
    train, _ = parallel.pmap_steps(devices)
    state, batch = parallel.replicate(state, devices), parallel.shard_batch(batch, devices)
  else:
    mesh = parallel.local_mesh(devices)
    train, _ = parallel.shard_map_steps(mesh)
    state, batch = parallel.replicate_on_mesh(state, mesh), parallel.shard_batch_on_mesh(batch, mesh)
  window = parallel.InFlight()
  losses_seen = []
  for i in range(200):
    state, metrics = train(state, batch, jax.random.fold_in(KEY, i))
    window(metrics)
    if i in (0, 199):
      losses_seen.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
  window.drain()
  assert int(np.asarray(state.step).reshape(-1)[0]) == 200
  assert losses_seen[1] < losses_seen[0]


def _donating_steps(mode):
  """A donating train step of ``mode``, and the placed state and batch it takes."""
  state, batch = make_state(), classification_batch(n=8)
  if mode == "pmap":
    train, _ = parallel.pmap_steps()
    return train, parallel.replicate(state), parallel.shard_batch(batch)
  if mode == "shard_map":
    mesh = parallel.local_mesh()
    train, _ = parallel.shard_map_steps(mesh)
    return train, parallel.replicate_on_mesh(state, mesh), parallel.shard_batch_on_mesh(
        batch, mesh)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  train, _ = parallel.sharded_jit_steps(mesh)
  return train, parallel.replicate_on_mesh(state, mesh), parallel.shard_batch_on_mesh(
      batch, mesh)


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "sharded_jit"])
def test_reusing_a_donated_state_is_a_clear_error(mode):
  """Under pmap a second call on the donated state used to end the process
  (segmentation fault); now every helper refuses it in Python."""
  train, state, batch = _donating_steps(mode)
  new_state, _ = train(state, batch, KEY)
  with pytest.raises(ValueError, match="donated to an earlier call"):
    train(state, batch, KEY)
  newer, _ = train(new_state, batch, KEY)  # the returned state goes on
  assert int(np.asarray(newer.step).reshape(-1)[0]) == 2


def test_steps_built_without_donation_keep_the_state():
  train, _ = parallel.pmap_steps(donate=False)
  state, batch = parallel.replicate(make_state()), parallel.shard_batch(classification_batch(8))
  first, _ = train(state, batch, KEY)
  again, _ = train(state, batch, KEY)
  assert tree_allclose(first.params, again.params, rtol=0, atol=0)
