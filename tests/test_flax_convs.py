"""Plain ``flax.linen.Conv`` layers computed as matmuls on CPU
(``jaxtrain.conv.flax_convs``, used by ``fit``): the same values and gradients
as ``lax.conv``, the same parameters, every unsupported case left to ``lax``,
and ``execution="auto"`` deciding from what the model then runs."""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain
from benchmarks.baselines import FlaxExampleCNN
from jaxtrain.nn.conv import flax_convs
from jaxtrain.train import execution
from jaxtrain.train.execution import choose_execution, runs_primitive

MATMUL_CASES = {
    "3x3 same": dict(features=4, kernel_size=(3, 3)),
    "3x3 valid no bias": dict(features=4, kernel_size=(3, 3), padding="VALID", use_bias=False),
    "5x5 same": dict(features=3, kernel_size=(5, 5)),
    "1x1": dict(features=6, kernel_size=(1, 1)),
    "2x4 explicit": dict(features=2, kernel_size=(2, 4), padding=((1, 0), (2, 1))),
    "3x3 circular": dict(features=4, kernel_size=(3, 3), padding="CIRCULAR"),
    "int padding": dict(features=4, kernel_size=(3, 3), padding=2),
    "stride 2": dict(features=4, kernel_size=(3, 3), strides=2),
    "1x1 stride 2": dict(features=4, kernel_size=(1, 1), strides=2),
}
LAX_CASES = {
    "stride 3": dict(features=4, kernel_size=(3, 3), strides=3),
    "dilated": dict(features=4, kernel_size=(3, 3), kernel_dilation=2),
    "grouped": dict(features=4, kernel_size=(3, 3), feature_group_count=2),
    "1-d": dict(features=4, kernel_size=(3,)),
    "9x9": dict(features=2, kernel_size=(9, 9)),
}


def inputs_for(kw):
  shape = (2, 11) if len(kw["kernel_size"]) == 1 else (2, 9, 10)
  return jax.random.normal(jax.random.key(1), shape + (4,))


def both(kw, batch_shape=None):
  conv = nn.Conv(**kw)
  x = inputs_for(kw)
  if batch_shape:
    x = x.reshape(batch_shape + x.shape[1:])
  variables = conv.init(jax.random.key(0), x)

  def loss(variables, x):
    return jnp.sum(jnp.sin(conv.apply(variables, x)))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  reference = grad(variables, x)
  with flax_convs("matmul"):
    jaxpr = jax.make_jaxpr(loss)(variables, x)
    fast = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
  return reference, fast, jaxpr


@pytest.mark.parametrize("name", sorted(MATMUL_CASES))
def test_matmul_convs_equal_lax_with_their_gradients(name):
  reference, fast, jaxpr = both(MATMUL_CASES[name])
  assert not runs_primitive(jaxpr.jaxpr, "conv_general_dilated")
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(fast)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(LAX_CASES))
def test_other_convs_are_left_to_lax(name):
  reference, fast, jaxpr = both(LAX_CASES[name])
  assert runs_primitive(jaxpr.jaxpr, "conv_general_dilated")
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(fast)):
    np.testing.assert_array_equal(a, b)


def test_extra_batch_axes_and_parameters_are_flax_own():
  reference, fast, _ = both(MATMUL_CASES["3x3 same"], batch_shape=(1, 2))
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(fast)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  conv = nn.Conv(4, (3, 3))
  x = jnp.ones((1, 5, 5, 2))
  with flax_convs("matmul"):
    inside = conv.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, inside) == jax.tree.map(jnp.shape,
                                                        conv.init(jax.random.key(0), x))
  # The module is left as it was, also after an error inside the call.
  with pytest.raises(TypeError), flax_convs("matmul"):
    conv.apply(inside, x, "unexpected")
  assert conv.conv_general_dilated is None


def test_xla_leaves_every_conv_to_lax():
  conv = nn.Conv(4, (3, 3))
  x = jnp.ones((1, 5, 5, 2))
  variables = conv.init(jax.random.key(0), x)
  with flax_convs("xla"):
    jaxpr = jax.make_jaxpr(conv.apply)(variables, x)
  assert runs_primitive(jaxpr.jaxpr, "conv_general_dilated")
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    with flax_convs("fast"):
      pass


def test_auto_execution_follows_what_the_model_runs():
  state = jaxtrain.create_train_state(FlaxExampleCNN(), optax.sgd(0.1), jax.random.key(0),
                                      jnp.zeros((1, 28, 28, 1)),
                                      loss_fn=jaxtrain.losses.cross_entropy)
  x = np.zeros((1, 28, 28, 1), np.float32)
  config = jaxtrain.FitConfig(epochs=1, batch_size=8)
  assert choose_execution(state, config, x) == "scan"  # nn.Conv as matmuls, on CPU
  xla = jaxtrain.FitConfig(epochs=1, batch_size=8, conv_impl="xla")
  assert choose_execution(state, xla, x) == "step"  # no batch to measure on: the cost model


def test_auto_execution_measures_a_model_that_runs_lax_conv(tmp_path, monkeypatch):
  state = jaxtrain.create_train_state(FlaxExampleCNN(), optax.sgd(0.1), jax.random.key(0),
                                      jnp.zeros((1, 28, 28, 1)),
                                      loss_fn=jaxtrain.losses.cross_entropy)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.random((8, 28, 28, 1), np.float32),
           "targets": rng.integers(0, 10, 8).astype(np.int32)}
  # As beside a compilation cache in tmp_path (JAX's cache directory is process-wide).
  monkeypatch.setattr(execution, "_store_path", lambda: tmp_path / "executions.json")
  monkeypatch.setattr(execution, "_EXECUTIONS", collections.OrderedDict())
  xla = jaxtrain.FitConfig(epochs=1, batch_size=8, conv_impl="xla")
  found = execution.explain(state, xla, batch["inputs"][:1], batch)
  assert found["by"] == "measured" and found["step_ms"] > 0 and found["scan_ms"] > 0
  assert found["pick"] == ("step" if found["scan_ms"] >= execution.MARGIN * found["step_ms"]
                           else "scan")
  assert execution.explain(state, xla, batch["inputs"][:1], batch) is found  # once per setup
  # The pick is kept beside the compiled programs: the next process takes it.
  stored = json.loads((tmp_path / "executions.json").read_text())
  assert list(stored.values()) == [found["pick"]]
  monkeypatch.setattr(execution, "_EXECUTIONS", collections.OrderedDict())
  assert execution.explain(state, xla, batch["inputs"][:1], batch) == {
      "pick": found["pick"], "by": "cache"}
  # Convolutions as matmuls: the cost model, nothing measured.
  auto = jaxtrain.FitConfig(epochs=1, batch_size=8)
  assert execution.explain(state, auto, batch["inputs"][:1], batch) == {
      "pick": "scan", "by": "cost model"}
  with pytest.raises(ValueError, match="conv_impl must be one of.*'fast'"):
    jaxtrain.fit(state, {"inputs": np.zeros((8, 28, 28, 1), np.float32),
                         "targets": np.zeros(8, np.int32)},
                 config=jaxtrain.FitConfig(epochs=1, batch_size=8, conv_impl="fast"))


def test_fit_trains_the_same_model_either_way():
  rng = np.random.default_rng(0)
  data = {"inputs": rng.random((64, 28, 28, 1), np.float32),
          "targets": rng.integers(0, 10, 64).astype(np.int32)}
  state = jaxtrain.create_train_state(FlaxExampleCNN(), optax.sgd(0.05, momentum=0.9),
                                      jax.random.key(0), data["inputs"][:1],
                                      loss_fn=jaxtrain.losses.cross_entropy)
  runs = {impl: jaxtrain.fit(state, data, log=lambda _: None, config=jaxtrain.FitConfig(
      epochs=2, batch_size=16, conv_impl=impl, progress=False, histogram_every=0))
      for impl in ("matmul", "xla")}
  np.testing.assert_allclose(runs["matmul"].history["step"]["loss"],
                             runs["xla"].history["step"]["loss"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(runs["matmul"].state.params),
                  jax.tree.leaves(runs["xla"].state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_the_measured_pick_is_the_next_process_pick(tmp_path):
  """A resumed run is a new process: it takes the pick stored beside the
  compilation cache instead of measuring again (scan and step differ in rounding)."""
  script = f"""
import jax, numpy as np, optax
jax.config.update("jax_compilation_cache_dir", {str(tmp_path)!r})
import jaxtrain
from benchmarks.baselines import FlaxExampleCNN
from jaxtrain.train import execution
state = jaxtrain.create_train_state(FlaxExampleCNN(), optax.sgd(0.1), jax.random.key(0),
                                    np.zeros((1, 28, 28, 1), np.float32),
                                    loss_fn=jaxtrain.losses.cross_entropy)
rng = np.random.default_rng(0)
batch = {{"inputs": rng.random((8, 28, 28, 1), np.float32),
          "targets": rng.integers(0, 10, 8).astype(np.int32)}}
config = jaxtrain.FitConfig(epochs=1, batch_size=8, conv_impl="xla")
print(execution.explain(state, config, batch["inputs"][:1], batch)["by"])
"""
  runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parents[1]) for _ in range(2)]
  assert [r.stdout.split()[-1] if r.stdout else r.stderr for r in runs] == ["measured", "cache"]
