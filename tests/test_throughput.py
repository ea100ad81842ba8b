"""Throughput in the epoch rows, activation histograms and profiler traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain import losses, models
from jaxtrain.core.activations import activations
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.train.config import columns
from jaxtrain.train.throughput import Throughput, peak_flops, profile_range, step_flops
from tests.test_monitor import _events


def mlp_state(hidden=(32,), inputs=16, outputs=4, **kwargs):
  return jaxtrain.create_train_state(
      models.MLP(hidden_sizes=hidden, outputs=outputs, **kwargs),
      jaxtrain.make_optimizer("sgd", 0.1), jax.random.key(0), jnp.zeros((1, inputs)),
      loss_fn=losses.cross_entropy)


def arrays(n=96, inputs=16, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, inputs)).astype(np.float32)
  return {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}


def test_step_flops_count_the_matmuls_of_a_forward_and_backward_pass():
  batch = 64
  forward = 2 * batch * (16 * 32 + 32 * 4)  # multiply-adds of the two Dense layers
  # Backward: both weight gradients and the hidden layer's input gradient (not
  # the inputs': nothing needs it).
  matmuls = 2 * forward + 2 * batch * 32 * 4
  flops = step_flops(mlp_state(), arrays(), batch)
  # The rest (ReLU, softmax, the SGD update) is small beside them.
  assert matmuls <= flops <= 1.2 * matmuls, flops / matmuls
  assert step_flops(mlp_state(), arrays(), 2 * batch) == pytest.approx(2 * flops, rel=0.05)


def test_rates_and_peak():
  rates = Throughput(600, 10, flops_per_step=3e6, peak=2e9).rates(2.0)
  assert rates == {"examples_per_second": 300.0, "flops_per_second": 1.5e7,
                   "peak_fraction": 0.0075}
  assert Throughput(600, 10).rates(0.0) == {}
  assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
  assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 494.7e12
  assert peak_flops("cpu", "fp32") is None


def test_activations_are_each_layers_output_in_eval_mode():
  state = mlp_state(dropout_rate=0.5)
  x = arrays()["inputs"][:8]
  found = activations(state, x)
  kernel, bias = state.params["Dense_0"]["kernel"], state.params["Dense_0"]["bias"]
  np.testing.assert_allclose(found["Dense_0"], x @ kernel + bias, rtol=1e-5, atol=1e-6)
  # Dropout in eval mode passes its input through: the activations are fixed.
  np.testing.assert_array_equal(found["output"], state.apply_fn(state.variables, x,
                                                                train=False))
  np.testing.assert_array_equal(found["output"], activations(state, x)["output"])


def test_batch_norm_model_activations_leave_statistics_alone():
  model = models.CNN(features=(4,), dense=8, outputs=3, dropout_rate=0.0)
  state = jaxtrain.create_train_state(model, jaxtrain.make_optimizer("sgd", 0.1),
                                      jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                      loss_fn=losses.cross_entropy)
  before = jax.tree.map(np.asarray, state.batch_stats)
  found = activations(state, np.ones((2, 8, 8, 1), np.float32))
  assert any("BatchNorm" in name for name in found) and found["output"].shape == (2, 3)
  jax.tree.map(np.testing.assert_array_equal, before, state.batch_stats)


def run_fit(tmp_path, **config):
  state, data = mlp_state(), arrays()
  fit_config = jaxtrain.FitConfig(epochs=4, batch_size=32, histogram_every=2, **config)
  logged = columns(state, fit_config, data, has_val=True)
  with RunMonitor(tmp_path, columns=logged, total_steps=12, steps_per_epoch=3,
                  progress=False) as monitor:
    result = jaxtrain.fit(state, data, val=data, config=fit_config, monitor=monitor)
  return result, logged


def test_fit_logs_throughput_and_activation_histograms(tmp_path, capsys):
  result, logged = run_fit(tmp_path)
  out = capsys.readouterr().out
  assert out.count("ex/s") == 4 and "GFLOP/s" in out
  scalars, histograms = {}, set()
  for event in _events(tmp_path):
    for value in event.summary.value:
      if value.HasField("histo"):
        histograms.add((value.tag, event.step))
      else:
        scalars.setdefault(value.tag, []).append(value.simple_value)
  seconds = result.history["epoch"]["seconds"]
  np.testing.assert_allclose(scalars["epoch/examples_per_second"],
                             [96 / s for s in seconds], rtol=1e-5)
  flops = step_flops(mlp_state(), arrays(), 32) * 3
  np.testing.assert_allclose(scalars["epoch/flops_per_second"],
                             [flops / s for s in seconds], rtol=1e-5)
  assert "epoch/peak_fraction" not in scalars  # a CPU has no stated peak
  # Activations on the weights' cadence (epochs 2 and 4 end at steps 6 and 12).
  for tag in ("activations/Dense_0", "activations/output", "weights/Dense_0/kernel",
              "grads/Dense_0/kernel"):
    assert {(tag, 6), (tag, 12)} <= histograms, tag
  # metrics.csv keeps its columns: the rates are TensorBoard's and the line's.
  header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
  assert header == ",".join(logged) and "examples_per_second" not in header


def test_profile_steps_write_a_trace(tmp_path, capsys):
  run_fit(tmp_path, profile_steps=(3, 6))
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert "profile of steps 4..6" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["4:2", "a:b", "3", (-1, 3), "2:2"])
def test_bad_profile_ranges_are_refused(value):
  with pytest.raises(ValueError, match="--profile-steps"):
    profile_range(value)


def test_a_profile_past_the_run_is_refused(tmp_path):
  with pytest.raises(ValueError, match="--profile-steps.*12 steps"):
    run_fit(tmp_path, profile_steps=(10, 20))


def test_a_process_without_a_run_directory_does_not_trace():
  """The other processes of a multi-process run have no monitor: only process
  0 traces (rank 1 used to fail reading monitor.workdir)."""
  from jaxtrain.train.throughput import Profile

  profile = Profile((0, 2))
  profile.before(0, None)
  assert not profile.active and profile.directory is None
  profile.after(2, {}, print)  # nothing to stop
