"""What ``--track`` costs: ``python -m experiments.two_moons`` (its defaults: 100 epochs
of 25 steps) as a whole process, without a tracker and with each one, alternating, in
fresh run directories; trackers offline (W&B offline, MLflow's SQLite store and Trackio's
local store in a temporary folder).

    uv run python -m benchmarks.trackers_bench --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {"without": "", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio",
            "all three": "mlflow,wandb,trackio"}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=100)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="trackers_bench_")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
  env.update(WANDB_MODE="offline", TRACKIO_DIR=os.path.join(root, "trackio"),
             JAXTRAIN_CACHE_DIR=os.path.join(root, "cache"))
  times = {name: [] for name in VARIANTS}
  loads = []
  for repeat in range(args.repeats + 1):  # the first round warms caches: not counted
    for name, track in VARIANTS.items():
      workdir = os.path.join(root, "runs", f"{name.replace(' ', '_')}_{repeat}")
      command = [sys.executable, "-m", "experiments.two_moons", "--workdir", workdir,
                 "--epochs", str(args.epochs)] + (["--track", track] if track else [])
      start = time.perf_counter()
      subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
      if repeat:
        times[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
  base = statistics.median(times["without"])
  print(f"load average during the runs: median {statistics.median(loads):.2f} "
        f"({os.cpu_count()} CPUs); seconds per whole process, medians of {args.repeats}")
  print("| variant | median (s) | vs without | runs (s) |\n|---|---|---|---|")
  for name, values in times.items():
    median = statistics.median(values)
    print(f"| {name} | {median:.2f} | {median - base:+.2f} s | "
          f"{', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
  main()
