"""What checkpointing costs: per save, and per epoch when saving every epoch.

    uv run python -m benchmarks.checkpoint_bench [--repeats 7] [--saves 10] [--epochs 15]

The workload is mnist_pigeon (``experiments.mnist_pigeon``): the first 1024 MNIST
training images, the next 1024 for validation, a 784-30-1 MLP, BCE with logits,
SGD (lr 0.005, momentum 0.9), batches of 32: 32 steps an epoch plus the
evaluation of both sets. Its state is small (23.6k parameters, the momentum and
the step: ~190 kB), so the numbers are mostly the fixed cost of an Orbax save.

1. Per save: ``Checkpointer.save`` of the arrays ``fit`` saves (the state and
   the run record as JSON) into a fresh directory, ``--saves`` times; "blocking"
   is the time ``save`` takes to return, "total" the time until the checkpoint
   is complete on disk (``save`` + ``wait``). Async: orbax copies the arrays and
   writes in a background thread; sync: ``save`` returns when written.
2. Per epoch: ``jaxtrain.fit`` for ``--epochs`` epochs (compiled beforehand),
   without checkpoints and with ``CheckpointConfig(every_epochs=1)``, async and
   sync, interleaved, ``--repeats`` runs each. "ckpt share" is the extra time per
   epoch over the epoch time with saving: ``(t_mode - t_none) / t_mode``.

Medians are printed; the machine's load average is printed too, since other
work on it shifts every row. ``$JAXTRAIN_MNIST_DIR`` (default
``../shared/data/mnist``) holds the MNIST IDX files.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MNIST_DIR = pathlib.Path(os.environ.get("JAXTRAIN_MNIST_DIR", ROOT.parent / "shared/data/mnist"))


def _workload():
  import jax

  from experiments import mnist_pigeon

  if not MNIST_DIR.is_dir():
    sys.exit(f"MNIST IDX files not found in {MNIST_DIR} (set $JAXTRAIN_MNIST_DIR)")
  config = mnist_pigeon.Config(data_dir=MNIST_DIR)
  train, val = mnist_pigeon.load_data(config)
  state = mnist_pigeon.create_state(config)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return config, train, val, state, n_params


def _fit_config(epochs: int):
  import jaxtrain

  return jaxtrain.FitConfig(epochs=epochs, batch_size=32, seed=0, progress=False,
                            histogram_every=0)


def _record(epochs: int, spe: int) -> dict:
  """A run record like the one fit saves after ``epochs`` epochs."""
  from jaxtrain.train.config import COLUMNS
  from jaxtrain.train.ledger import Position
  from jaxtrain.train.stopping import Best

  row = {c: 0.123456789 for c in COLUMNS} | {"epoch": epochs, "step": epochs * spe}
  position = Position(epoch=epochs, best=Best(0.1, 1, 0), rows=[row] * epochs,
                      step_records=epochs * spe)
  return {"position": position.to_json(), "seed": 0, "run_key": [0, 0]}


def time_saves(state, *, async_save: bool, saves: int) -> tuple[list[float], list[float]]:
  """Blocking and total seconds of ``saves`` saves into a fresh directory."""
  import jax

  from jaxtrain.core.state import state_arrays
  from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer

  arrays = jax.device_put({"state": state_arrays(state)})
  meta = _record(15, 32)
  blocking, total = [], []
  with tempfile.TemporaryDirectory() as workdir:
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=async_save, keep=2))
    try:
      for i in range(saves + 1):  # the first save pays one-time setup; dropped
        started = time.perf_counter()
        checkpointer.save((i + 1) * 32, arrays, meta, metric=1.0 / (i + 1))
        returned = time.perf_counter()
        checkpointer.wait()
        done = time.perf_counter()
        if i:
          blocking.append(returned - started)
          total.append(done - started)
    finally:
      checkpointer.close()
  return blocking, total


def time_fit(state, train, val, *, epochs: int, mode: str) -> tuple[float, list[float]]:
  """Seconds of one fit (``mode``: none, async or sync) and its blocking saves."""
  import jaxtrain
  from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer

  with tempfile.TemporaryDirectory() as workdir:
    checkpointer = None
    if mode != "none":
      checkpointer = Checkpointer(workdir, CheckpointConfig(
          every_epochs=1, async_save=mode == "async", keep=2))
    try:
      started = time.perf_counter()
      jaxtrain.fit(state, train, val=val, config=_fit_config(epochs),
                   checkpointer=checkpointer, log=lambda message: None)
      seconds = time.perf_counter() - started
    finally:
      if checkpointer is not None:
        checkpointer.close()
    return seconds, list(checkpointer.save_seconds) if checkpointer else []


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7, help="fits per mode (>= 5)")
  parser.add_argument("--saves", type=int, default=10, help="saves per mode")
  parser.add_argument("--epochs", type=int, default=15, help="epochs per fit")
  args = parser.parse_args(argv)

  import jax
  import orbax.checkpoint

  import jaxtrain

  _, train, val, state, n_params = _workload()
  nbytes = sum(x.nbytes for x in jax.tree.leaves(
      (state.params, state.opt_state, state.step)))
  spe = -(-len(train["targets"]) // 32)
  print(f"mnist_pigeon: {len(train['targets'])} train / {len(val['targets'])} val images, "
        f"{n_params} parameters, state {nbytes / 1e3:.0f} kB, {spe} steps/epoch")
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), orbax-checkpoint "
        f"{orbax.checkpoint.__version__}, load average {os.getloadavg()[0]:.1f} at start")

  # 1. Per save.
  save_rows = {}
  for mode in ("async", "sync"):
    blocking, total = time_saves(state, async_save=mode == "async", saves=args.saves)
    save_rows[mode] = (statistics.median(blocking), statistics.median(total))

  # 2. Per epoch: compile first, then interleave the modes.
  jaxtrain.fit(state, train, val=val, config=_fit_config(1), log=lambda message: None)
  fits = {"none": [], "async": [], "sync": []}
  blocking_in_fit = {"async": [], "sync": []}
  for _ in range(args.repeats):
    for mode in fits:
      seconds, saves = time_fit(state, train, val, epochs=args.epochs, mode=mode)
      fits[mode].append(seconds)
      if mode in blocking_in_fit:
        blocking_in_fit[mode].extend(saves)

  print(f"\nPer save (median of {args.saves}; {nbytes / 1e3:.0f} kB of arrays + the run "
        "record as JSON):\n")
  print("| mode  | blocking ms | total until on disk ms |")
  print("|-------|------------:|-----------------------:|")
  for mode, (blocking, total) in save_rows.items():
    print(f"| {mode:5s} | {blocking * 1e3:11.1f} | {total * 1e3:22.1f} |")

  epoch_none = statistics.median(fits["none"]) / args.epochs
  print(f"\nPer epoch, saving every epoch (fit of {args.epochs} epochs, median of "
        f"{args.repeats} runs each, interleaved):\n")
  print("| checkpoints        | epoch ms | save blocking ms (median) | ckpt share of epoch |")
  print("|--------------------|---------:|--------------------------:|--------------------:|")
  print(f"| none               | {epoch_none * 1e3:8.1f} | {'-':>25s} | {'-':>19s} |")
  for mode in ("async", "sync"):
    epoch = statistics.median(fits[mode]) / args.epochs
    share = (epoch - epoch_none) / epoch
    blocking = statistics.median(blocking_in_fit[mode]) * 1e3
    print(f"| every epoch, {mode:5s} | {epoch * 1e3:8.1f} | {blocking:25.1f} | "
          f"{share * 100:18.0f}% |")
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
  main()
