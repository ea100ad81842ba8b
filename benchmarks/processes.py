"""2 processes x 1 CPU device against 1 process x 2 CPU devices, steps/s.

    uv run python -m benchmarks.processes --repeats 5

Runs ``experiments.two_moons --devices 2`` (batch 32, ``--samples`` points,
``--epochs`` epochs) either under ``python -m jaxtrain.launch -n 2 --cpu-devices 1``
(gloo collectives between the processes) or in one process with two fake CPU
devices, alternately, and reports the median training steps/s (steps over the
sum of metrics.csv's ``seconds``: compile and start-up excluded) and the median
wall time of the whole command.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(mode: str, args) -> tuple[float, float]:
  with tempfile.TemporaryDirectory() as tmp:
    common = ["-m", "experiments.two_moons", "--workdir", os.path.join(tmp, "run"),
              "--devices", "2", "--samples", str(args.samples), "--epochs", str(args.epochs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    if mode == "2 processes x 1 device":
      cmd = [sys.executable, "-m", "jaxtrain.launch", "-n", "2", "--cpu-devices", "1", "--",
             *common]
    else:
      cmd = [sys.executable, *common]
      env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    wall = time.perf_counter() - start
    with open(os.path.join(tmp, "run", "metrics.csv"), newline="") as f:
      rows = list(csv.DictReader(f))
    seconds = sum(float(r["seconds"]) for r in rows)
    return int(rows[-1]["step"]) / seconds, wall


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--epochs", type=int, default=40)
  args = parser.parse_args(argv)
  modes = ["1 process x 2 devices", "2 processes x 1 device"]
  results = {m: [] for m in modes}
  for _ in range(args.repeats):
    for mode in modes:  # alternated, so load drifts hit both
      results[mode].append(run_once(mode, args))
  print(f"two_moons --devices 2, {args.epochs} epochs of {args.samples} points, batch 32; "
        f"medians of {args.repeats}; load {os.getloadavg()[0]:.1f} at the end\n")
  print("| setup | training steps/s | whole command s | vs 1 process |")
  print("|---|---|---|---|")
  base = statistics.median(r[0] for r in results[modes[0]])
  for mode in modes:
    rate = statistics.median(r[0] for r in results[mode])
    wall = statistics.median(r[1] for r in results[mode])
    print(f"| {mode} | {rate:.0f} | {wall:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
  main()
