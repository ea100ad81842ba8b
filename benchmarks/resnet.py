"""ResNet-18 as flax publishes it (``examples/imagenet/models.py``, pasted unchanged in
``tests/published.py``) on CIFAR-sized random data (32x32x3, 10 classes), SGD lr 0.1
momentum 0.9, cross-entropy: steady training steps/s of

- ``fit`` as a user calls it (``execution="auto"``, ``conv_impl="auto"``), its pick
  printed, and ``fit`` in each execution (``"scan"``, ``"step"``);
- the per-step ``jax.jit(jaxtrain.train_step)`` loop a user would write (``lax.conv``),
  and the same loop traced under ``jaxtrain.conv.flax_convs()`` (the matmul paths);
- PyTorch (``benchmarks/resnet_torch.py``, the same network) under
  ``$JAXTRAIN_TORCH_PYTHON`` when set (a scratch venv with torch), 2 threads;

each a median of ``--repeats`` timings of ``--steps`` steps after a compiling
warm-up, all in one run (one machine, one load).

    JAXTRAIN_TORCH_PYTHON=/path/to/venv/bin/python \\
      uv run python -m benchmarks.resnet --width 16 --batch 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxtrain
from jaxtrain import losses
from jaxtrain.nn import conv
from jaxtrain.train import execution
from tests import published


def _state(width: int):
  model = published.ResNet18(num_classes=10, num_filters=width)
  return jaxtrain.create_train_state(
      model, jaxtrain.make_optimizer("sgd", 0.1, momentum=0.9), jax.random.key(0),
      jnp.zeros((1, 32, 32, 3)), loss_fn=losses.cross_entropy)


def _data(batch: int, steps: int):
  rng = np.random.default_rng(0)
  return {"inputs": rng.normal(size=(batch * steps, 32, 32, 3)).astype(np.float32),
          "targets": rng.integers(0, 10, size=(batch * steps,)).astype(np.int32)}


def fit_rate(width, batch, steps, repeats, **options) -> tuple[float, list[float]]:
  """steps/s of ``fit`` over ``steps`` steps (one epoch, no evaluation), after a
  compiling run of the same setup."""
  data = _data(batch, steps)
  config = jaxtrain.FitConfig(epochs=1, batch_size=batch, progress=False, histogram_every=0,
                              evaluate_train=False, **options)
  template = _state(width)
  times = []
  for _ in range(repeats + 1):
    state = jax.tree.map(lambda a: jnp.array(a, copy=True), template)
    start = time.perf_counter()
    result = jaxtrain.fit(state, data, config=config, log=lambda message: None)
    jax.block_until_ready(result.state.params)
    times.append(time.perf_counter() - start)
  rates = [steps / t for t in times[1:]]
  return statistics.median(rates), rates


def loop_rate(width, batch, steps, repeats, impl: str | None) -> tuple[float, list[float]]:
  """steps/s of a per-step ``jax.jit(jaxtrain.train_step)`` loop (donating the
  state), traced under ``flax_convs(impl)`` when ``impl`` is set."""
  data = _data(batch, steps)
  batches = [jax.device_put({k: v[i * batch:(i + 1) * batch] for k, v in data.items()})
             for i in range(steps)]
  run_key = jax.random.key(0)
  step = jax.jit(jaxtrain.train_step, donate_argnums=0)
  state = _state(width)

  def go(state, n):
    for i in range(n):
      state, metrics = step(state, batches[i % steps], jaxtrain.key_for(run_key, "dropout", i))
    jax.block_until_ready(metrics)
    return state

  if impl is None:
    state = go(state, 2)  # compiles
  else:
    with conv.flax_convs(impl):
      state = go(state, 2)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = go(state, steps)
    rates.append(steps / (time.perf_counter() - start))
  return statistics.median(rates), rates


def torch_rate(width, batch, steps, repeats):
  python = os.environ.get("JAXTRAIN_TORCH_PYTHON")
  if not python:
    return None
  script = os.path.join(os.path.dirname(__file__), "resnet_torch.py")
  done = subprocess.run([python, script, "--width", str(width), "--batch", str(batch),
                         "--steps", str(steps), "--repeats", str(repeats)],
                        capture_output=True, text=True, check=True,
                        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
  out = json.loads(done.stdout.strip().splitlines()[-1])
  return out["steps_per_s"], out["rates"]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rows", default="fit,scan,step,loop,loop_matmul,torch")
  args = parser.parse_args()
  shape = (args.width, args.batch, args.steps, args.repeats)
  batch = {"inputs": np.zeros((args.batch, 32, 32, 3), np.float32),
           "targets": np.zeros(args.batch, np.int32)}
  how = execution.explain(_state(args.width), jaxtrain.FitConfig(epochs=1, batch_size=args.batch),
                          batch["inputs"][:1], batch)
  pick = how["pick"] + (f", measured: step {how['step_ms']:.1f} ms, scan {how['scan_ms']:.1f} ms"
                        if how["by"] == "measured" else f", {how['by']}")
  rows = {
      "fit": (f"`fit` default (auto: {pick})", lambda: fit_rate(*shape)),
      "scan": ("`fit(execution=\"scan\")`", lambda: fit_rate(*shape, execution="scan")),
      "step": ("`fit(execution=\"step\")`", lambda: fit_rate(*shape, execution="step")),
      "loop": ("per-step `jax.jit(train_step)` loop", lambda: loop_rate(*shape, None)),
      "loop_matmul": ("the same loop under `flax_convs()`", lambda: loop_rate(*shape, "auto")),
      "torch": ("PyTorch 2 threads", lambda: torch_rate(*shape)),
  }
  results = {}
  for key in args.rows.split(","):
    label, measure = rows[key]
    results[key] = (label, measure())
  base = results.get("loop", (None, (None,)))[1][0]
  print(f"ResNet-18 width {args.width}, batch {args.batch}, {args.steps} steps x "
        f"{args.repeats}; load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print("| row | steps/s (median) | vs the jit loop | runs |\n|---|---|---|---|")
  for label, measured in results.values():
    if measured is None:
      print(f"| {label} | (not run: set JAXTRAIN_TORCH_PYTHON) | | |")
      continue
    rate, runs = measured
    ratio = f"{rate / base:.2f}x" if base else ""
    print(f"| {label} | {rate:.2f} | {ratio} | {', '.join(f'{r:.2f}' for r in runs)} |")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
