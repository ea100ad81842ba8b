"""SIGTERM and SIGINT from the process's first moment: a stop request.

``python -m experiments.NAME`` installs :func:`handler` while the package is
imported, before JAX is: a signal during start-up, data loading or compilation
is kept and handed to the run (``jaxtrain.run.run`` adopts it and stops at
its first call boundary, saying what was saved), and one after the run ended
changes nothing. A second SIGINT aborts at once in one line; the last
checkpoint stays intact (Orbax writes each one to a temporary folder first).
"""

from __future__ import annotations

import os
import signal
import sys

received: list[str] = []


def abort(name: str = "SIGINT") -> None:
  sys.stderr.write(f"error: second {name}: aborted at once; the last checkpoint is intact\n")
  sys.stderr.flush()
  os._exit(130)


def handler(signum, frame) -> None:
  name = signal.Signals(signum).name
  if received and signum == signal.SIGINT:
    abort(name)
  received.append(name)


# What jaxtrain.run.run reads from the handler it replaces.
handler.received = received
handler.abort = abort


def install() -> None:
  """Installs :func:`handler` for SIGTERM and SIGINT (main thread only)."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, handler)
