"""Benchmarks: jaxtrain against a per-step ``jax.jit`` loop and PyTorch.

    uv run python -m benchmarks.run [--only NAME ...] [--repeats N] [--out BENCHMARKS.md]

Every row runs in a fresh worker process (``--worker WORKLOAD:ROW``), so its
peak RSS and its compile time are its own. ``benchmarks.workloads`` holds what
is measured (workloads, rows, their data and models), ``benchmarks.workers``
how a worker times one row (``benchmarks.timing``: its timing helpers), and
``benchmarks.report`` the tables, MUST verdicts and environment written here.

PyTorch rows run ``benchmarks/torch_baselines.py`` in-process in a worker of
this interpreter when it can ``import torch``, else under
``$JAXTRAIN_TORCH_PYTHON``; without either they are left out with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import report, workers
from benchmarks.workloads import ROOT, WORKLOADS, Row, Workload, torch_data_file

WORKER_TIMEOUT_S = 600


def _load():
  return os.getloadavg()[0]


def _torch_command() -> list[str] | None | str:
  """How to run the PyTorch rows: "in-process", an interpreter, or None."""
  if importlib.util.find_spec("torch") is not None:
    return "in-process"
  python = os.environ.get("JAXTRAIN_TORCH_PYTHON")
  if python and shutil.which(python):
    return [python]
  return None


def _run_row(workload: Workload, row: Row, repeats: int, torch_how, tmp: str) -> dict:
  env = dict(os.environ)
  env["JAXTRAIN_CACHE_DIR"] = "off"  # compile times are compile times
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see BENCHMARKS.md: PyTorch threads
  env.setdefault("PYTHONUNBUFFERED", "1")
  if row.kind == "torch" and torch_how != "in-process":
    data = _run_data_file(workload.name, tmp)
    cmd = torch_how + [str(ROOT / "benchmarks/torch_baselines.py"), "--workload",
                       workload.name, "--data", data, "--repeats", str(repeats),
                       "--threads", str(row.opt("threads", 2))]
    marker = ""
  else:
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker",
           f"{workload.name}:{row.key}", "--repeats", str(repeats)]
    marker = "@@RESULT "
  started = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
  wall = time.perf_counter() - started
  lines = [l for l in proc.stdout.splitlines() if l.startswith(marker) and l.strip()]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
  result = json.loads(lines[-1][len(marker):])
  result["worker_wall_s"] = wall
  return result


def _run_data_file(workload: str, tmp: str) -> str:
  path = os.path.join(tmp, f"{workload}.npz")
  if not os.path.exists(path):
    torch_data_file(workload, tmp)
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS),
                      help="workloads to run (default: all)")
  parser.add_argument("--rows", nargs="*", help="row keys to run (default: all)")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed runs per row after the first and second (median; >= 5)")
  parser.add_argument("--out", default=None, help="also write the tables to this file")
  parser.add_argument("--json", default=None, help="also write raw results as JSON")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return workers.worker(args.worker, args.repeats)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.repeats < 5:
    print(f"note: --repeats {args.repeats}: medians of fewer than 5 runs are only a "
          "smoke test", file=sys.stderr)
  torch_how = _torch_command()
  env_info = report.environment(torch_how)
  names = args.only or list(WORKLOADS)
  started = time.perf_counter()
  out_lines = report.preamble(env_info, torch_how, args.repeats)
  raw = {"environment": env_info, "workloads": {}}
  print("\n".join(out_lines), flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      workload = WORKLOADS[name]
      results, loads = {}, []
      for row in workload.rows:
        if args.rows and row.key not in args.rows:
          continue
        if row.kind == "torch" and torch_how is None:
          results[row.key] = {"error": "PyTorch not available (pip install torch, or set "
                                       "JAXTRAIN_TORCH_PYTHON)"}
          continue
        load_before = _load()
        result = _run_row(workload, row, args.repeats, torch_how, tmp)
        result["load_start"] = load_before
        loads += [load_before] + ([result["load_end"][0]] if "load_end" in result else [])
        results[row.key] = result
        print(f"  [{name}:{row.key}] "
              + (f"error: {result['error']}" if "error" in result else
                 f"median {report.median(result.get('times', [])):.4g} s, worker "
                 f"{result['worker_wall_s']:.0f} s, load {load_before:.1f}"),
              file=sys.stderr, flush=True)
      table, notes = report.table(workload, results)
      block = [f"### {workload.title}", "", workload.description, ""]
      if workload.reference:
        block += [f"Issue's numbers (CEO's machine): {workload.reference}.", ""]
      block += table + [""] + notes
      block += ["", f"Load average (1 min) during the rows: "
                f"{min(loads):.1f} - {max(loads):.1f}." if loads else "", ""]
      print("\n".join(block), flush=True)
      out_lines += block
      raw["workloads"][name] = results
  total = time.perf_counter() - started
  out_lines.append(f"Total benchmark time: {total:.0f} s.")
  print(out_lines[-1])
  if args.out:
    report.write_markdown(pathlib.Path(args.out), out_lines)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
  main()
