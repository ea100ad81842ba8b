"""What reliability costs: checkpointing's share under the default cadence, and
how long a signal takes to end a run.

    uv run python -m benchmarks.reliability [--repeats 5] [--cnn-epochs 2]

1. Checkpoint share: each experiment's own command with its default cadence
   (``--checkpoint.every-seconds 300`` with the adaptive cadence: a save once
   the time since the last reaches 20x a save's measured cost, at least 5 s,
   and at the end), run in this process. The time spent inside
   ``Checkpointer.save`` (until the arrays are copied; Orbax writes in the
   background) and ``Checkpointer.wait`` / ``close`` (waiting for a write) is
   summed and divided by the wall time of the experiment's ``run()`` call
   (training, evaluation, saves; not the process's start-up). two_moons and
   mnist_pigeon run their defaults; mnist_cnn ``--epochs`` ``--cnn-epochs``.
2. Signal to exit: ``python -m experiments.mnist_cnn`` (the default model, and
   a wide one, ``--features 64 128 --dense 256``) is sent SIGTERM once its first
   compiled calls have been logged (steps.jsonl is not empty) plus a random
   0-1 s; the time from the signal to the process's exit is measured. It
   covers the rest of the compiled call in flight, the save and the exit.

Medians of ``--repeats`` and the load average are printed. MNIST IDX files are
read from ``$JAXTRAIN_MNIST_DIR`` (default ``../shared/data/mnist``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MNIST_DIR = pathlib.Path(os.environ.get("JAXTRAIN_MNIST_DIR", ROOT.parent / "shared/data/mnist"))


@contextlib.contextmanager
def timed_checkpointing():
  """Sums the seconds spent in Checkpointer.save/wait/close (and counts saves)."""
  from jaxtrain.rundir import checkpoint as ckpt

  spent, saves, depth = [0.0], [0], [0]
  originals = {name: getattr(ckpt.Checkpointer, name) for name in ("save", "wait", "close")}

  def timing(name):
    def method(self, *args, **kwargs):
      start = time.perf_counter()
      depth[0] += 1
      try:
        return originals[name](self, *args, **kwargs)
      finally:
        depth[0] -= 1
        if not depth[0]:  # close() calls wait(): counted once
          spent[0] += time.perf_counter() - start
        saves[0] += name == "save"
    return method

  for name in originals:
    setattr(ckpt.Checkpointer, name, timing(name))
  try:
    yield spent, saves
  finally:
    for name, method in originals.items():
      setattr(ckpt.Checkpointer, name, method)


def checkpoint_share(name: str, args: list[str]) -> tuple[float, int, float]:
  """(share of run() time spent checkpointing, saves, run() seconds)."""
  import importlib

  from experiments import _cli
  from jaxtrain.rundir import run as run_lib

  module = importlib.import_module(f"experiments.{name}")
  wall = [0.0]
  original = run_lib.run

  def timed_run(*a, **k):
    start = time.perf_counter()
    try:
      return original(*a, **k)
    finally:
      wall[0] += time.perf_counter() - start

  with tempfile.TemporaryDirectory() as tmp, timed_checkpointing() as (spent, saves):
    module.run = timed_run  # the name each experiment calls
    try:
      _cli.main(module.Config, module.main, [*args, "--workdir", os.path.join(tmp, "run")])
    finally:
      module.run = original
  return spent[0] / wall[0], saves[0], wall[0]


def signal_to_exit(args: list[str]) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist_cnn", "--data-dir", str(MNIST_DIR),
         "--workdir", str(workdir), "--epochs", "50", *args], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = workdir / "steps.jsonl"
    while not (steps.is_file() and steps.stat().st_size):
      if child.poll() is not None:
        raise RuntimeError("mnist_cnn ended before training")
      time.sleep(0.01)
    time.sleep(random.random())
    sent = time.perf_counter()
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=600)
    if child.returncode != 0:
      raise RuntimeError(f"mnist_cnn exited {child.returncode} after SIGTERM")
    return time.perf_counter() - sent


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cnn-epochs", type=int, default=2)
  args = parser.parse_args(argv)
  random.seed(0)
  data = ["--data-dir", str(MNIST_DIR)]
  experiments = {"two_moons": [], "mnist_pigeon": data,
                 "mnist_cnn": [*data, "--epochs", str(args.cnn_epochs)]}
  print(f"Checkpointing under the default cadence; medians of {args.repeats}\n")
  print("| experiment | run() s | saves | checkpoint s | share |")
  print("|---|---|---|---|---|")
  for name, flags in experiments.items():
    results = [checkpoint_share(name, flags) for _ in range(args.repeats)]
    share = statistics.median(r[0] for r in results)
    wall = statistics.median(r[2] for r in results)
    saves = statistics.median(r[1] for r in results)
    print(f"| {name} {' '.join(flags[2:])} | {wall:.2f} | {saves:g} | {share * wall:.3f} | "
          f"{share:.1%} |", flush=True)
  print(f"\nSIGTERM to exit, mnist_cnn; medians of {args.repeats}\n")
  print("| model | signal to exit s (median) | min | max |")
  print("|---|---|---|---|")
  for label, flags in (("default (32, 64; dense 128)", []),
                       ("wide (64, 128; dense 256)",
                        ["--features", "64", "128", "--dense", "256"])):
    times = [signal_to_exit(flags) for _ in range(args.repeats)]
    print(f"| {label} | {statistics.median(times):.2f} | {min(times):.2f} | "
          f"{max(times):.2f} |", flush=True)
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
