"""The cost of an epoch callback on two_moons (1000 points, 80/20, MLP 16, batch
32, 100 epochs of 25 steps, SGD 0.1 momentum 0.9), three ways:

* ``fit`` alone (no run directory), with a no-op callback every epoch vs without,
  in one process, alternating, after one warm-up run of each;
* the experiment as users run it: whole ``python -m experiments.two_moons``
  processes (defaults, a fresh ``--workdir`` each), one of them with a no-op
  epoch callback added to its ``run`` call (``--experiment``), alternating;
* the floor of any host code at every epoch, even inside the compiled loop: a
  scan of 2500 steps calling ``jax.experimental.io_callback`` (under
  ``lax.cond``) at every 25th step vs not (``--in-program``).

    uv run python -m benchmarks.callbacks_bench --repeats 7 [--experiment] [--in-program]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxtrain
from jaxtrain import datasets, losses, models


def _table(times: dict) -> None:
  base = statistics.median(next(iter(times.values())))
  print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
  for name, values in times.items():
    median = statistics.median(values)
    print(f"| {name} | {median:.3f} | {100 * (median / base - 1):+.1f}% | "
          f"{', '.join(f'{v:.3f}' for v in values)} |")


def experiment_child(workdir: str, with_callback: bool) -> None:
  """``python -m experiments.two_moons --workdir WORKDIR`` with, or without, a
  no-op epoch callback in its ``run`` call; checks the callback ran each epoch."""
  from experiments import _cli, two_moons

  calls = []
  if with_callback:
    two_moons.run = functools.partial(two_moons.run,
                                      callbacks=[jaxtrain.Callback(lambda event: calls.append(1))])

  def main(config):
    two_moons.main(config)
    assert len(calls) == (config.epochs if with_callback else 0), len(calls)
  sys.argv = ["experiments.two_moons", "--workdir", workdir]
  _cli.command(two_moons.Config, main)  # as `python -m experiments.two_moons` runs


def experiment(repeats: int) -> None:
  env = dict(os.environ)
  env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine
  times = {"python -m experiments.two_moons": [], "the same, a no-op epoch callback": []}
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(repeats + 1):  # the first round warms caches, untimed
      for i, name in enumerate(times):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "benchmarks.callbacks_bench", "--child",
                        f"{tmp}/run{repeat}_{i}", str(i)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        if repeat:
          times[name].append(time.perf_counter() - start)
  _table(times)


def in_program(repeats: int) -> None:
  from jax.experimental import io_callback

  calls = []

  def host(epoch, params):
    calls.append(int(epoch))
    return np.bool_(False)

  def program(with_callback):
    def body(carry, i):
      w, stop = carry
      w = w - 0.01 * jnp.tanh(w @ w.T) @ w
      if with_callback:
        stop = jax.lax.cond((i + 1) % 25 == 0, lambda: io_callback(
            host, jax.ShapeDtypeStruct((), jnp.bool_), i // 25, w, ordered=True), lambda: stop)
      return (w, stop), w.sum()
    return jax.jit(lambda w: jax.lax.scan(body, (w, jnp.bool_(False)), jnp.arange(2500)))
  w = jnp.full((16, 16), 0.01)
  programs = {"scan of 2500 steps": program(False),
              "the same, io_callback every 25 steps": program(True)}
  times = {name: [] for name in programs}
  for f in programs.values():
    jax.block_until_ready(f(w))
  for _ in range(repeats):
    for name, f in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(f(w))
      times[name].append(time.perf_counter() - start)
  assert len(calls) == 100 * (repeats + 1)
  _table(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--experiment", action="store_true",
                      help="also time whole two_moons processes with and without")
  parser.add_argument("--in-program", action="store_true",
                      help="also time io_callback inside a compiled loop")
  parser.add_argument("--child", nargs=2, metavar=("WORKDIR", "WITH"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return experiment_child(args.child[0], args.child[1] == "1")
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
  _table(times)
  if args.in_program:
    in_program(args.repeats)
  if args.experiment:
    experiment(args.repeats)


if __name__ == "__main__":
  main()
