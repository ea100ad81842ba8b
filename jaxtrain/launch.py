"""Starts N processes of one run on this machine: for trying multi-process
training and for tests (clusters use their own launchers, e.g. ``srun``).

    uv run python -m jaxtrain.launch -n 2 --cpu-devices 2 -- -m experiments.two_moons --devices 4

Each child runs ``python ARGS...`` with ``JAX_COORDINATOR_ADDRESS`` (a free
local port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set, which
``jaxtrain.engine.distributed.initialize`` (every experiment calls it) reads.
Their output lines come prefixed with the rank. If one child fails (or is
killed), the others are stopped (SIGTERM, then SIGKILL after ``--grace``
seconds) and the launcher exits with that child's status, naming its rank.

A SIGTERM, SIGINT or SIGHUP to the launcher goes to every child, once: the
children run in process groups of their own, so a Ctrl-C in the terminal
reaches them through the launcher only (from the terminal too, each would
take the second copy for a second Ctrl-C and abort). A signal at any moment
is a stop request, start-up included: the children start with SIGTERM and
SIGINT blocked, so one sent before a child can answer it waits, pending,
until jaxtrain installs its handler (``python -m experiments.NAME`` at its
first import, ``jaxtrain.engine.distributed.initialize`` and
``jaxtrain.run.run`` otherwise) and unblocks them. A program that uses none
of these must unblock them itself (``signal.pthread_sigmask``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # blocked in a child until it answers them
FORWARDED = (*STOP_SIGNALS, signal.SIGHUP)


def unblock_stop_signals() -> None:
  """Lets SIGTERM and SIGINT in, once a handler answers them (the launcher
  starts its children with them blocked; a pending one arrives now)."""
  if threading.current_thread() is threading.main_thread():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator binds it next)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(stream, rank: int, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"[{rank}] {line}")
      out.flush()
  stream.close()


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with status {code}"


def launch(args: list[str], processes: int, *, cpu_devices: int = 0, grace: float = 10.0,
           env: dict[str, str] | None = None) -> int:
  """Runs ``python args...`` as ``processes`` ranks; returns the run's exit status."""
  if processes < 1:
    raise ValueError(f"-n must be >= 1, got {processes}")
  base = dict(os.environ if env is None else env)
  base["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{free_port()}"
  base["JAX_NUM_PROCESSES"] = str(processes)
  if cpu_devices:
    kept = [f for f in base.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    base["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={cpu_devices}"])
  lock = threading.Lock()
  children, pumps, forwarded = [], [], []

  def forward(signum, frame):
    forwarded.append(signum)  # a child started after this gets it too
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in FORWARDED}
  # Blocked while ``python -m jaxtrain.launch`` imported jaxtrain: one sent
  # then arrives now, and goes to every rank as it starts.
  signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
  status = 0
  try:
    for rank in range(processes):
      child_env = {**base, "JAX_PROCESS_ID": str(rank), "PYTHONUNBUFFERED": "1"}
      # Blocked in the child from its first instruction (the mask survives
      # exec): a signal before jaxtrain's handler waits for it, never kills.
      mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
      try:
        child = subprocess.Popen([sys.executable, *args], env=child_env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 process_group=0)
      finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
      children.append(child)
      for signum in dict.fromkeys(forwarded):
        child.send_signal(signum)
      for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
        pump = threading.Thread(target=_pump, args=(stream, rank, out, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    while [c.poll() for c in children].count(None):  # every child polled: any() stops early
      failed = [(r, c.returncode) for r, c in enumerate(children)
                if c.returncode not in (None, 0)]
      if failed:
        rank, code = failed[0]
        status = code if code > 0 else 128 - code
        # Stopped first: saying so may wait on a reader of our output.
        for child in children:
          if child.poll() is None:
            child.terminate()
        with lock:
          print(f"launch: rank {rank} {_describe(code)}; stopping the other ranks",
                file=sys.stderr, flush=True)
        _stop(children, grace)
        break
      time.sleep(0.05)
    for rank, child in enumerate(children):
      code = child.wait()
      if code and not status:
        with lock:
          print(f"launch: rank {rank} {_describe(code)}", file=sys.stderr, flush=True)
        status = code if code > 0 else 128 - code
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for pump in pumps:
      pump.join(timeout=5)
  return status


def _stop(children, grace: float) -> None:
  for child in children:
    if child.poll() is None:
      child.terminate()
  deadline = time.monotonic() + grace
  for child in children:
    try:
      child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m jaxtrain.launch", description=__doc__.splitlines()[0],
      usage="python -m jaxtrain.launch -n N [--cpu-devices K] -- ARGS...")
  parser.add_argument("-n", "--processes", type=int, required=True, help="ranks to start")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="fake CPU devices per process (XLA's host device count; 0: as set)")
  parser.add_argument("--grace", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping the ranks")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="python's arguments, after --")
  options = parser.parse_args(argv)
  args = options.args[1:] if options.args[:1] == ["--"] else options.args
  if not args:
    parser.error("nothing to run: give python's arguments after --, e.g. -- -m experiments.two_moons")
  if options.processes < 1:
    parser.error(f"-n must be >= 1, got {options.processes}")
  sys.exit(launch(args, options.processes, cpu_devices=options.cpu_devices,
                  grace=options.grace))


if __name__ == "__main__":
  main()
