"""Peak RSS of a streamed run over a generated dataset on disk, by its size.

    uv run python -m benchmarks.stream_rss --gb 0.2 2

For each size: writes ``inputs.npy`` (float32 [n, 784]) and ``targets.npy`` in
a temporary folder (never in memory whole), then in a fresh process trains one
epoch of an MLP 784-256-10 (batch 256) with ``FitConfig(data="stream")`` from
``jaxtrain.data.npy_source`` and reports its peak RSS (VmHWM), steps/s
and the load; the dataset is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROW = 784


def write(folder: str, gb: float) -> int:
  import numpy as np
  n = int(gb * 1e9 / (ROW * 4))
  x = np.lib.format.open_memmap(os.path.join(folder, "inputs.npy"), "w+", np.float32, (n, ROW))
  y = np.lib.format.open_memmap(os.path.join(folder, "targets.npy"), "w+", np.int32, (n,))
  rng = np.random.default_rng(0)
  for a in range(0, n, 65536):
    b = min(n, a + 65536)
    x[a:b] = rng.standard_normal((b - a, ROW), np.float32)
    y[a:b] = rng.integers(0, 10, b - a)
  x.flush(), y.flush()
  return n


def peak_rss_gb() -> float:
  """This process's peak resident memory (VmHWM: unlike ``ru_maxrss`` it does
  not carry the parent's peak over the fork and exec)."""
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1e6
  raise RuntimeError("no VmHWM in /proc/self/status")


def child(folder: str) -> None:
  import jax

  import jaxtrain
  source = jaxtrain.data.npy_source(folder)
  state = jaxtrain.create_train_state(
      jaxtrain.models.MLP(hidden_sizes=(256,), outputs=10), jaxtrain.make_optimizer("adam", 1e-3),
      jax.random.key(0), source.read([0])["inputs"], loss_fn=jaxtrain.losses.cross_entropy)
  config = jaxtrain.FitConfig(epochs=1, batch_size=256, data="stream", evaluate_train=False,
                              progress=False)
  start = time.perf_counter()
  result = jaxtrain.fit(state, source, config=config, log=lambda _: None)
  seconds = time.perf_counter() - start
  steps = int(result.state.step)
  print(json.dumps({"rows": len(source), "steps": steps, "steps_per_s": steps / seconds,
                    "peak_rss_gb": peak_rss_gb()}))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, nargs="+", default=[0.2, 2.0])
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child(args.child)
  print("| dataset on disk | rows | steps | steps/s | peak RSS | load (1 min) |")
  print("|---|---|---|---|---|---|")
  for gb in args.gb:
    with tempfile.TemporaryDirectory() as folder:
      write(folder, gb)
      out = subprocess.run([sys.executable, "-m", "benchmarks.stream_rss", "--child", folder],
                           capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"| {gb:g} GB | {r['rows']} | {r['steps']} | {r['steps_per_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} GB | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
  main()
