"""A sweep's results: ``summary.csv``, the printed table and ``sweep.png``.

Members are ranked by the best value of the checkpoint monitor (``val_loss``
unless ``--checkpoint.monitor`` says otherwise) over their epochs: the epoch
number is a hyper-parameter too, and that epoch's parameters are what
``jaxtrain.checkpoint.load(member_dir, "best")`` returns.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence


def _best(values: Sequence, mode: str) -> tuple[int | None, float]:
  """(epoch from 1, value) of the best finite value, or (None, nan)."""
  scored = [(v if mode == "min" else -v, i) for i, v in enumerate(values)
            if isinstance(v, (int, float)) and math.isfinite(v)]
  if not scored:
    return None, math.nan
  _, index = min(scored)
  return index + 1, float(values[index])


def rows(config, sweep, results: Mapping) -> list[dict]:
  """One summary row per member, best first."""
  monitor, mode = config.checkpoint.monitor, config.checkpoint.mode
  out = []
  for member in sweep:
    result, program = results[member.name]
    history = result.history["epoch"]
    values = history.get(monitor, [])
    epoch, best = _best(values, mode)
    row = {"member": member.name, **member.values, "best_epoch": epoch,
           f"best_{monitor}": best, f"final_{monitor}": values[-1] if values else None,
           **{f"test_{k}": v for k, v in (result.test or {}).items()},
           "seconds": sum(s for s in history.get("seconds", []) if s is not None),
           "program": program, "run_dir": str(member.config.workdir)}
    out.append(row)
  sign = 1.0 if mode == "min" else -1.0
  out.sort(key=lambda r: (math.isnan(r[f"best_{monitor}"]), sign * r[f"best_{monitor}"]
                          if not math.isnan(r[f"best_{monitor}"]) else 0.0))
  return [{"rank": i + 1, **r} for i, r in enumerate(out)]


def _text(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return "" if value is None else str(value)


def table(summary: Sequence[dict]) -> str:
  """The summary as aligned text (without run directories)."""
  columns = [c for c in summary[0] if c != "run_dir"]
  cells = [[_text(r.get(c)) for c in columns] for r in summary]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def write_csv(summary: Sequence[dict], path) -> None:
  columns = list(dict.fromkeys(c for r in summary for c in r))
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    for r in summary:
      writer.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float)
                       else r[c] for c in columns])


def plot(config, sweep, results: Mapping, summary: Sequence[dict], path) -> None:
  """The monitor's curve of every member, and each member's best value."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    print("sweep: matplotlib is not installed; no sweep.png")
    return
  monitor = config.checkpoint.monitor
  figure = Figure(figsize=(11, 4.2), layout="constrained")
  curves, bests = figure.subplots(1, 2)
  for member in sweep:
    history = results[member.name][0].history["epoch"]
    values = history.get(monitor, [])
    curves.plot(history.get("epoch", range(1, len(values) + 1)), values,
                label=member.name if len(sweep) <= 12 else None)
  curves.set(xlabel="epoch", ylabel=monitor, title=f"{monitor} per member")
  if len(sweep) <= 12:
    curves.legend(fontsize=7)
  ranked = {r["member"]: r for r in summary}
  best = [ranked[m.name][f"best_{monitor}"] for m in sweep]
  axis = next(iter(sweep[0].values))
  try:
    xs = [float(m.values[axis]) for m in sweep]
  except ValueError:
    xs = None
  if xs is not None:
    bests.scatter(xs, best)
    if min(xs) > 0 and max(xs) / min(xs) >= 20:
      bests.set_xscale("log")
    bests.set(xlabel=axis)
  else:
    bests.bar(range(len(sweep)), best)
    bests.set_xticks(range(len(sweep)), [m.name[:2] for m in sweep])
    bests.set(xlabel="member")
  bests.set(ylabel=f"best {monitor}", title="best epoch's value per member")
  FigureCanvasAgg(figure).print_figure(path, dpi=110)


def report(config, sweep, results: Mapping) -> list[dict]:
  """Writes summary.csv and sweep.png, prints the table and the best member."""
  workdir = config.workdir
  summary = rows(config, sweep, results)
  write_csv(summary, workdir / "summary.csv")
  plot(config, sweep, results, summary, workdir / "sweep.png")
  monitor = config.checkpoint.monitor
  print(table(summary))
  top = summary[0]
  if top["best_epoch"] is None:
    print(f"sweep: no member has a finite {monitor}  ->  {workdir / 'summary.csv'}")
  else:
    print(f"best: {top['member']}, {monitor} {top[f'best_{monitor}']:.6g} at epoch "
          f"{top['best_epoch']}; its best checkpoint: jaxtrain.checkpoint.load("
          f"{top['run_dir']!r}, 'best')  ->  {workdir / 'summary.csv'}")
  return summary
