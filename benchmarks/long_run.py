"""Memory and checkpoint size of a long run: does either grow with the steps?

    uv run python -m benchmarks.long_run [--steps 2000000] [--ratio 10]

Trains ``python -m experiments.two_moons`` (default: 1000 points, batches of 32,
25 steps an epoch; its default checkpoint cadence) in a fresh process, twice:
``--steps / --ratio`` steps, then ``--steps`` steps, each in a new run directory
under ``--dir`` (a temporary folder by default, removed afterwards). A watcher
samples the process's resident memory (``VmRSS`` in ``/proc/<pid>/status``)
every ``--every`` seconds and maps time to step by the last line of
``steps.jsonl`` (written per epoch). Reported per run: RSS at 10% and 50% of the
steps (the first sample at or past that step), at 100% (the last sample before
the last step was written: still training, at most ``--every`` seconds before
its end), at exit (the last sample: after ``run`` has read the history back and
drawn curves.png) and its peak (``VmHWM`` at the last sample); the seconds to
the end of training and to exit; the size on disk of the last checkpoint
(its step folder; its JSON in brackets), of the checkpoints' log segments
(``checkpoints/logs``, if any) and of steps.jsonl. A run still going
``--limit`` seconds after it started is killed (reported as such). Targets:
RSS at 100% within 10% of RSS at 10%; the long run's last checkpoint within 2x
of the short run's. The load average is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def status(pid: int) -> dict[str, int]:
  """``VmRSS`` and ``VmHWM`` of ``pid`` in bytes (empty once it has exited)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
              if line.startswith(("VmRSS:", "VmHWM:"))}
  except (OSError, ValueError, IndexError):
    return {}


def last_step(path: pathlib.Path) -> int:
  """The step of the last complete line of ``steps.jsonl`` (0 before any)."""
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4096))
      lines = f.read().split(b"\n")[:-1]
    return int(json.loads(lines[-1])["step"]) if lines else 0
  except (OSError, ValueError, KeyError, IndexError):
    return 0


def size(path: pathlib.Path) -> int:
  """Bytes of the files under ``path`` (0 when absent)."""
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def train(workdir: pathlib.Path, epochs: int, steps: int, args) -> dict:
  """Runs two_moons for ``epochs`` epochs (``steps`` steps), sampling its memory."""
  command = [sys.executable, "-m", "experiments.two_moons", "--epochs", str(epochs),
             "--samples", str(args.samples), "--batch-size", str(args.batch_size),
             "--workdir", str(workdir)]
  samples, started, killed = [], time.perf_counter(), False
  child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  while child.poll() is None:
    memory = status(child.pid)
    if memory:
      samples.append((time.perf_counter() - started, last_step(workdir / "steps.jsonl"),
                      memory["VmRSS"], memory["VmHWM"]))
    if time.perf_counter() - started > args.limit:
      child.kill()
      killed = True
    time.sleep(args.every)
  seconds = time.perf_counter() - started
  if child.returncode and not killed:
    sys.exit(f"{' '.join(command)} failed (exit {child.returncode})")

  def at(fraction: float):  # the first sample at or past that step (else the last)
    return next((s for s in samples if s[1] >= fraction * steps), samples[-1])

  training = [s for s in samples if s[1] < steps] or samples
  if args.trace:
    with open(args.trace, "a") as f:
      f.write(json.dumps({"run": str(workdir), "samples": samples}) + "\n")

  checkpoints = workdir / "checkpoints"
  latest = max((p for p in checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  return {"steps": steps, "seconds": seconds, "trained": at(1.0)[0], "killed": killed,
          "rss": [at(0.1)[2], at(0.5)[2], training[-1][2], samples[-1][2]],
          "peak": samples[-1][3], "checkpoint": size(latest),
          "checkpoint_step": int(latest.name), "meta": size(latest / "meta"),
          "store": sum(size(p) for p in checkpoints.iterdir()
                       if not p.name.isdigit() and p.name != "deleting"),
          "steps_jsonl": size(workdir / "steps.jsonl")}


def mb(n: float) -> str:
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2_000_000, help="steps of the long run")
  parser.add_argument("--ratio", type=int, default=10, help="the short run has steps/ratio")
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
  parser.add_argument("--limit", type=float, default=1800, help="seconds before a run is killed")
  parser.add_argument("--dir", type=pathlib.Path, default=None, help="where the runs go (kept)")
  parser.add_argument("--label", default="", help="names the rows (e.g. before/after)")
  parser.add_argument("--trace", default=None, help="appends each run's samples (JSON) here")
  args = parser.parse_args(argv)
  train_rows = args.samples - int(round(args.samples * 0.2))  # two_moons' 80/20 split
  steps_per_epoch = -(-train_rows // args.batch_size)
  root = args.dir or pathlib.Path(tempfile.mkdtemp(prefix="jaxtrain-long-run-"))
  load = [os.getloadavg()[0]]
  results = []
  try:
    for name, steps in (("short", args.steps // args.ratio), ("long", args.steps)):
      epochs = max(1, steps // steps_per_epoch)
      results.append((name, train(root / name, epochs, epochs * steps_per_epoch, args)))
      load.append(os.getloadavg()[0])
  finally:
    if args.dir is None:
      shutil.rmtree(root, ignore_errors=True)
  print(f"two_moons, {args.samples} points, batch {args.batch_size} ({steps_per_epoch} steps "
        f"an epoch); 1-minute load average {', '.join(f'{x:.1f}' for x in load)} "
        "(start, after each run)\n")
  print("| run | steps | s to trained / exit | RSS 10% | RSS 50% | RSS 100% | 100%/10% "
        "| RSS at exit (peak) | last checkpoint (its JSON) | log segments | steps.jsonl |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name, r in results:
    rss = r["rss"]
    end = f"killed at {r['seconds']:.0f}" if r["killed"] else f"{r['seconds']:.0f}"
    print(f"| {' '.join(filter(None, (args.label, name)))} | {r['steps']:,} "
          f"| {r['trained']:.0f} / {end} | {mb(rss[0])} | {mb(rss[1])} | {mb(rss[2])} "
          f"| {rss[2] / rss[0]:.3f} | {mb(rss[3])} ({mb(r['peak'])}) "
          f"| {mb(r['checkpoint'])} ({mb(r['meta'])}) | {mb(r['store'])} "
          f"| {mb(r['steps_jsonl'])} |")
  (_, short), (_, long) = results
  print(f"\nlast checkpoint, long / short: {long['checkpoint'] / short['checkpoint']:.2f}x "
        f"(target <= 2); long run RSS 100% / 10%: {long['rss'][2] / long['rss'][0]:.3f} "
        "(target <= 1.10)")


if __name__ == "__main__":
  main()
