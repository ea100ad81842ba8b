"""What a run shows while it trains: a tqdm bar and a line per epoch.

:class:`Progress` writes no files. ``fit`` without a run directory shows the
run through one; :class:`jaxtrain.monitor.RunMonitor` (the run directory's
files) is one too, so the command line and research code print the same.
``fit`` hands it each compiled call's steps at once, when it fetches them
(:meth:`Progress.log_steps`: the bar advances per call; no other host sync),
then a row per epoch the call finished, in order (:meth:`Progress.log_epoch`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_SKIP_IN_LINE = ("epoch", "step", "seconds")  # Shown differently or not at all.
# Rates fit adds to a row (TensorBoard and the line, not metrics.csv), as the line shows them.
_RATES = {"examples_per_second": lambda v: f"{v:,.0f} ex/s",
          "flops_per_second": lambda v: f"{v / 1e9:.3g} GFLOP/s",
          "peak_fraction": lambda v: f"{100 * v:.3g}% of peak"}


class Progress:
  """A run's progress: a tqdm bar on stderr and a line per epoch; no files.

  Args:
    columns: the metrics of the epoch line, in order (a row's others follow).
    total_steps: steps of the whole run (the bar, the ETA).
    steps_per_epoch: steps per epoch (for "epoch 3/100").
    bar: ``True``: a tqdm bar (the lines print above it); ``False``: none;
      ``None``: a bar when stderr is a terminal.
    lines: print a line per epoch.
    start: steps done before (a resumed or continued run): the bar and the
      ETA start there.
    say: where the lines and :meth:`write`'s messages go (default: stdout,
      above the bar).
    quiet: print nothing (no bar, no line, no message).

  Example:
    >>> with Progress(["epoch", "step", "train_loss"], total_steps=4, steps_per_epoch=2,
    ...               bar=False) as progress:  # one call that ran both epochs
    ...   progress.log_steps(np.arange(1, 5), {"loss": np.array([0.75, 0.5, 0.25, 0.125])})
    ...   progress.log_epoch({"epoch": 1, "step": 2, "train_loss": 0.625})
    ...   progress.log_epoch({"epoch": 2, "step": 4, "train_loss": 0.1875})
    epoch 1/2  train_loss 0.625
    epoch 2/2  train_loss 0.1875
  """

  def __init__(self, columns: Sequence[str], *, total_steps: int, steps_per_epoch: int,
               bar: bool | None = None, lines: bool = True, start: int = 0,
               say: Callable[[str], None] | None = None, quiet: bool = False):
    self.columns = list(columns)
    self.total_steps = int(total_steps)
    self.num_epochs = -(-self.total_steps // max(int(steps_per_epoch), 1))
    self._lines, self._say, self._quiet = lines, say, quiet
    self._step = int(start)
    self._bar = None
    if not quiet and (sys.stderr.isatty() if bar is None else bar):
      from tqdm import tqdm  # Lazy: ~0.1 s to import.

      # smoothing=0: speed = steps since mark_compiled / time since then.
      self._bar = tqdm(total=self.total_steps, initial=self._step, unit="step",
                       dynamic_ncols=True, smoothing=0)
    self._t0, self._step0 = time.time(), self._step  # Rate clock.
    # Seconds per step between recent log_steps calls (one compiled call
    # each): the ETA takes their median, so a call that compiled (a new call
    # length, as after a resume) does not stretch it.
    self._paces, self._last = [], None

  def log_steps(self, steps: Sequence[int], metrics: Mapping[str, Any]) -> None:
    """Advances the bar by a call's steps (``metrics["loss"]``'s last value
    shown beside it)."""
    if not len(steps):
      return
    self._step += len(steps)
    now = time.time()
    if self._last is not None and self._step > self._last[1]:
      self._paces = [*self._paces, (now - self._last[0]) / (self._step - self._last[1])][-8:]
    self._last = (now, self._step)
    if self._bar is not None:
      if "loss" in metrics:
        loss = float(np.asarray(metrics["loss"]).reshape(-1)[-1])
        self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
      self._bar.update(len(steps))

  def log_epoch(self, row: Mapping[str, Any]) -> None:
    """Prints an epoch row's line."""
    if self._lines:
      self.write(self._epoch_line(row))

  def mark_compiled(self) -> None:
    """Restarts the speed/ETA clock (call after the first compiled step)."""
    self._t0, self._step0 = time.time(), self._step
    self._paces, self._last = [], None  # the next log_steps (the compiled call's) starts them
    if self._bar is not None:
      bar = self._bar
      bar.start_t = bar.last_print_t = time.time()
      bar.initial = bar.last_print_n = bar.n

  def write(self, message: str) -> None:
    """Prints ``message`` (to ``say``, else stdout) without breaking the bar."""
    if self._quiet:
      return
    say = self._say or (lambda line: print(line, flush=True))
    if self._bar is None:
      say(message)
    else:
      with self._bar.external_write_mode():  # clears the bar, redraws it after
        say(message)

  def flush(self) -> None:
    """Nothing to write to disk."""

  def close(self) -> None:
    """Closes the bar (it stays on the terminal); safe to call twice."""
    if self._bar is not None:
      self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _epoch_line(self, row: Mapping[str, Any]) -> str:
    row = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
    parts = [f"epoch {row.get('epoch', '?')}/{self.num_epochs}"]
    for name in self.columns + [k for k in row if k not in self.columns]:
      value = row.get(name)
      if name in _SKIP_IN_LINE or name in _RATES or value is None or isinstance(value, str):
        continue
      parts.append(f"{name} {value:.4g}" if isinstance(value, float)
                   else f"{name} {value}")
    if row.get("seconds") is not None:
      parts.append(f"{row['seconds']:.1f} s")
    parts += [show(row[name]) for name, show in _RATES.items() if row.get(name) is not None]
    elapsed, done = time.time() - self._t0, self._step - self._step0
    if self._bar is None and done > 0 and self._step < self.total_steps:
      from tqdm import tqdm

      pace = float(np.median(self._paces)) if self._paces else elapsed / done
      eta = (self.total_steps - self._step) * pace
      parts.append(f"eta {tqdm.format_interval(eta)}")
    return "  ".join(parts)
