"""The straight-line path against a bare jit loop, on one model with ``lax.conv``
(issue 29): where ``fit(execution="step")``'s time goes.

    uv run python -m benchmarks.straight_line [--repeats 5] [--steps 16]

The Flax MNIST example's CNN (``benchmarks.baselines.FlaxExampleCNN``), batch 128
of synthetic 28x28x1 images, SGD 0.1 momentum 0.9, convolutions as ``lax.conv``
(``conv_impl="xla"``). Rows, in one process, alternating, ms a step (median):
the Flax example's jitted step on a resident batch (``benchmarks.baselines``);
``jax.jit(jaxtrain.train_step)`` on the same batch; the same donating its state;
``fit(execution="step", conv_impl="xla")`` over ``--steps`` steps (its set-up
included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtrain
from benchmarks import baselines
from jaxtrain import losses
from jaxtrain.nn import conv


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  n, size = args.steps, args.batch
  x = rng.random((size * n, 28, 28, 1), np.float32)
  y = rng.integers(0, 10, size * n).astype(np.int32)
  model, tx = baselines.FlaxExampleCNN(), optax.sgd(0.1, 0.9)
  state = jaxtrain.create_train_state(model, tx, jax.random.key(0), x[:1],
                                      loss_fn=losses.cross_entropy)
  batch = {"inputs": jnp.asarray(x[:size]), "targets": jnp.asarray(y[:size])}
  key = jax.random.key(1)
  with conv.flax_convs("xla"):
    core = jax.jit(lambda s, b, k: jaxtrain.train_step(s, b, k)[0]).lower(
        state, batch, key).compile()
    donated = jax.jit(lambda s, b, k: jaxtrain.train_step(s, b, k)[0],
                      donate_argnums=0).lower(state, batch, key).compile()
  flax_state = baselines.TrainState.create(apply_fn=model.apply, params=state.params, tx=tx)
  flax_step, _ = baselines.make_steps("ce")
  config = jaxtrain.FitConfig(epochs=1, batch_size=size, execution="step", conv_impl="xla",
                              progress=False, histogram_every=0, evaluate_train=False)

  def loop(step, s, *args):
    for _ in range(n):
      s = step(s, *args)
    return s

  rows = {
      "the Flax example's jitted step (lax.conv)":
          lambda: loop(lambda s, b: flax_step(s, b)[0], flax_state, batch),
      "jax.jit(jaxtrain.train_step)": lambda: loop(core, state, batch, key),
      "the same, donating the state": lambda: loop(
          donated, jax.tree.map(jnp.copy, state), batch, key),
      'fit(execution="step", conv_impl="xla")': lambda: jaxtrain.fit(
          state, {"inputs": x, "targets": y}, config=config, log=lambda _: None).state,
  }
  times = {name: [] for name in rows}
  for repeat in range(args.repeats + 1):  # the first round compiles: untimed
    for name, run in rows.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      if repeat:
        times[name].append((time.perf_counter() - start) * 1e3 / n)
  base = statistics.median(next(iter(times.values())))
  print("| row | ms a step (median) | vs the Flax example's step | runs |")
  print("|---|---|---|---|")
  for name, values in times.items():
    median = statistics.median(values)
    print(f"| {name} | {median:.2f} | {base / median:.2f}x | "
          f"{', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
  main()
