"""SIGTERM and SIGINT from the process's first moment: a stop request.

``python -m experiments.NAME`` installs :func:`handler` while the package is
imported, before JAX is: a signal during start-up, data loading or compilation
is kept and handed to the run (``jaxtrain.run.run`` adopts it and stops at
its first call boundary, saying what was saved); one after a run that ended
on its own changes nothing. A second SIGINT aborts at once in one line, also
after the run it stopped, while the process finishes; the last checkpoint
stays intact (Orbax writes each one to a temporary folder first).

"At once" holds inside a long compiled call too: Python runs handlers only
between bytecodes, so while the main thread waits in XLA both SIGINTs would
wait with it. CPython's C-level handler also writes each signal's number to
the wakeup fd (:func:`signal.set_wakeup_fd`) the moment it arrives; a daemon
thread reading it aborts at the second SIGINT, whichever Python handler is
installed then (``stop_on_signals`` swaps them during a run).
"""

from __future__ import annotations

import os
import signal
import threading

received: list[str] = []
_aborting = threading.Lock()  # the watcher and the handler both see a second SIGINT


def abort(name: str = "SIGINT") -> None:
  if not _aborting.acquire(blocking=False):
    threading.Event().wait()  # the other one is saying it and exiting
  # os.write, not sys.stderr: the watcher must not wait on a lock the main thread holds.
  os.write(2, f"error: second {name}: aborted at once; the last checkpoint is intact\n".encode())
  os._exit(130)


def handler(signum, frame) -> None:
  name = signal.Signals(signum).name
  if received and signum == signal.SIGINT:
    abort(name)
  received.append(name)


# What jaxtrain.run.run reads from the handler it replaces.
handler.received = received
handler.abort = abort


_seen: list[bool] = [False]  # a SIGTERM/SIGINT the current stop request answers


def forget() -> None:
  """A run that got no signal has ended: the next SIGINT is a first stop
  request, not a second one (as for the Python-level handlers)."""
  _seen[0] = False


handler.forget = forget


def _watch(fd: int) -> None:
  """Aborts at a SIGINT after a SIGTERM/SIGINT not yet forgotten."""
  while data := os.read(fd, 512):
    for signum in data:
      if signum == signal.SIGINT and _seen[0]:
        abort()
      _seen[0] = _seen[0] or signum in (signal.SIGINT, signal.SIGTERM)


def _forget_wakeup_fd() -> None:
  """A forked child would write its signals into the parent's pipe."""
  try:
    signal.set_wakeup_fd(-1)
  except ValueError:  # not forked from the main thread
    pass


def _start_watcher() -> None:
  read, write = os.pipe()
  os.set_blocking(write, False)  # set_wakeup_fd requires it
  previous = signal.set_wakeup_fd(write)
  if previous != -1:  # someone else's (asyncio's loop): leave it theirs
    signal.set_wakeup_fd(previous)
    os.close(read)
    os.close(write)
    return
  os.register_at_fork(after_in_child=_forget_wakeup_fd)
  threading.Thread(target=_watch, args=(read,), name="second-sigint", daemon=True).start()


def install() -> None:
  """Installs :func:`handler` for SIGTERM and SIGINT, and the watcher that
  aborts at a second SIGINT inside a compiled call (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    return
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, handler)
  _start_watcher()
  # jaxtrain.launch starts its ranks with both blocked: one sent before now
  # was pending, and arrives here as a stop request.
  signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
