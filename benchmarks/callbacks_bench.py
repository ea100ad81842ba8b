"""The cost of an epoch callback: two_moons' default fit (1000 points, 80/20,
MLP 16, batch 32, 100 epochs, SGD 0.1 momentum 0.9) with a no-op callback every
epoch vs without, in one process, alternating, after one warm-up run of each.

    uv run python -m benchmarks.callbacks_bench --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxtrain
from jaxtrain import datasets, losses, models


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--epochs", type=int, default=100)
  args = parser.parse_args()
  x, y = datasets.two_moons(jax.random.key(0), n_samples=1000, noise=0.2)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  train = {"inputs": x[:800], "targets": y[:800]}
  val = {"inputs": x[800:], "targets": y[800:]}
  template = jaxtrain.create_train_state(
      models.MLP(hidden_sizes=(16,), outputs=2),
      jaxtrain.make_optimizer("sgd", 0.1, momentum=0.9), jax.random.key(0),
      jnp.zeros((1, 2)), loss_fn=losses.cross_entropy)
  plain = jaxtrain.FitConfig(epochs=args.epochs, batch_size=32, progress=False)
  # Early stopping that never stops: the host judges every epoch, as for a callback.
  judged = jaxtrain.FitConfig(epochs=args.epochs, batch_size=32, progress=False,
                              early_stopping=jaxtrain.EarlyStopping(patience=10**6))
  calls = []

  def noop(event):
    calls.append(1)

  every = [jaxtrain.Callback(noop)]
  variants = {"without": (plain, None), "no-op epoch callback": (plain, every),
              "no-op callback every 10 epochs": (plain, [jaxtrain.Callback(noop, every_epochs=10)]),
              "early stopping, without": (judged, None),
              "early stopping + no-op epoch callback": (judged, every)}

  def once(variant) -> float:
    config, callbacks = variant
    state = jax.tree.map(lambda a: jnp.array(a, copy=True), template)
    start = time.perf_counter()
    result = jaxtrain.fit(state, train, val=val, config=config, callbacks=callbacks,
                          log=lambda message: None)
    jax.block_until_ready(result.state.params)
    return time.perf_counter() - start

  times = {name: [] for name in variants}
  for variant in variants.values():
    once(variant)  # warm-up: compiles
  for _ in range(args.repeats):
    for name, variant in variants.items():
      times[name].append(once(variant))
  assert len(calls) == (2 * args.epochs + args.epochs // 10) * (args.repeats + 1)
  base = statistics.median(times["without"])
  print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
  for name, values in times.items():
    median = statistics.median(values)
    print(f"| {name} | {median:.3f} | {100 * (median / base - 1):+.1f}% | "
          f"{', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
  main()
