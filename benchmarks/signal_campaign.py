"""SIGTERM at random moments of 2-process runs: does every process end cleanly,
how soon, and does the rerun equal the uninterrupted run?

    uv run python -m benchmarks.signal_campaign [--trials 20] [--experiments two_moons mnist_cnn]

For each experiment, one uninterrupted 2-process run (``python -m
jaxtrain.launch -n 2 --cpu-devices 2``) is the reference. Then, per trial and
per target (the launcher, or rank 1 alone), a run is started, sent SIGTERM
after a random delay in ``[0.05 s, --latest]`` (start-up included: importing
JAX, ``jax.distributed.initialize``, compiling), and waited for. A trial is
clean when the launcher exits 0, and the same command run again to the end
leaves ``metrics.csv`` and ``steps.jsonl`` equal to the reference's (timing
columns aside). The time from the signal to the launcher's exit covers the
rest of the compiled call in flight, one save and the exit of both ranks.

The table: per experiment and target, the clean trials, hangs (no exit within
``--timeout``), the median and maximum seconds from signal to exit, and the
load average. Run directories go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
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
EXPERIMENTS = {
    "two_moons": ["-m", "experiments.two_moons", "--devices", "4", "--samples", "400",
                  "--epochs", "60", "--checkpoint.every-epochs", "10"],
    "mnist_cnn": ["-m", "experiments.mnist_cnn", "--devices", "4", "--epochs", "1",
                  "--data-dir", str(MNIST_DIR)],
}
UNTIMED = ("seconds", "time", "per_s")  # columns that differ between equal runs


def command(experiment: str, workdir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "jaxtrain.launch", "-n", "2", "--cpu-devices", "2", "--grace",
          "3", "--", *EXPERIMENTS[experiment], "--workdir", str(workdir)]


def environment() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine
  return env


def records(workdir: pathlib.Path):
  """metrics.csv rows and steps.jsonl records without their timing fields."""
  def untimed(row):
    return {k: v for k, v in row.items() if not any(t in k for t in UNTIMED)}

  with open(workdir / "metrics.csv", newline="") as f:
    rows = [untimed(r) for r in csv.DictReader(f)]
  with open(workdir / "steps.jsonl") as f:
    steps = [untimed(json.loads(line)) for line in f]
  return rows, steps


def rank_pid(launcher: int, rank: int) -> int | None:
  for task in pathlib.Path(f"/proc/{launcher}/task").iterdir():
    for child in (task / "children").read_text().split():
      try:
        environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
      except FileNotFoundError:
        continue
      if f"JAX_PROCESS_ID={rank}".encode() in environ:
        return int(child)
  return None


def trial(experiment: str, target: str, delay: float, workdir: pathlib.Path, reference,
          timeout: float) -> dict:
  launcher = subprocess.Popen(command(experiment, workdir), cwd=ROOT, env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  time.sleep(delay)
  if target == "launcher":
    launcher.send_signal(signal.SIGTERM)
  else:
    while (pid := rank_pid(launcher.pid, 1)) is None and launcher.poll() is None:
      time.sleep(0.001)  # not started yet: the signal goes to it once it is
    if pid is not None:
      os.kill(pid, signal.SIGTERM)
  sent = time.monotonic()
  try:
    code = launcher.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    launcher.kill()
    launcher.wait()
    return {"code": None, "seconds": None, "same": False}
  seconds = time.monotonic() - sent
  same = False
  if code == 0:
    rerun = subprocess.run(command(experiment, workdir), cwd=ROOT, env=environment(),
                           capture_output=True, timeout=900)
    same = rerun.returncode == 0 and records(workdir) == reference
  return {"code": code, "seconds": seconds, "same": same}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=20, help="moments per experiment and target")
  parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                      choices=list(EXPERIMENTS))
  parser.add_argument("--latest", type=float, default=6.0,
                      help="the latest moment, in seconds after the launch")
  parser.add_argument("--timeout", type=float, default=120.0,
                      help="seconds after the signal that count as a hang")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  draw = random.Random(args.seed)
  print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
  table = []
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    for experiment in args.experiments:
      subprocess.run(command(experiment, scratch / experiment), cwd=ROOT, env=environment(),
                     capture_output=True, check=True, timeout=900)
      reference = records(scratch / experiment)
      for target in ("rank 1", "launcher"):
        results, loads = [], []
        for i in range(args.trials):
          delay = round(draw.uniform(0.05, args.latest), 2)
          loads.append(os.getloadavg()[0])
          result = trial(experiment, target.split()[0], delay,
                         scratch / f"{experiment}-{target[0]}-{i}", reference, args.timeout)
          print(json.dumps({"experiment": experiment, "target": target, "delay": delay,
                            **result}), flush=True)
          results.append(result)
        seconds = [r["seconds"] for r in results if r["seconds"] is not None]
        table.append((experiment, target, sum(r["code"] == 0 and r["same"] for r in results),
                      len(results), sum(r["code"] is None for r in results),
                      statistics.median(seconds) if seconds else float("nan"),
                      max(seconds, default=float("nan")), statistics.median(loads)))
  print("\n| experiment | SIGTERM to | clean, rerun equal | hangs | signal to exit s (median / max)"
        " | load |")
  print("|---|---|---|---|---|---|")
  for experiment, target, clean, total, hangs, median, most, load in table:
    print(f"| {experiment} | {target} | {clean}/{total} | {hangs} | {median:.2f} / {most:.2f} "
          f"| {load:.1f} |")


if __name__ == "__main__":
  main()
