"""``--sweep``: a grid or random search over an experiment's flags.

    uv run python -m experiments.two_moons --sweep learning_rate=0.01,0.05,0.1 --sweep hidden=15,30,60
    uv run python -m experiments.two_moons --sweep learning_rate=log:0.001:1 --sweep-trials 8

``FIELD=A,B,C`` lists values (the grid is every combination of the lists);
``FIELD=LO:HI`` and ``FIELD=log:LO:HI`` are ranges drawn uniformly (or
log-uniformly) by ``--sweep-trials N`` random members (``--sweep-seed``), where
lists are drawn from too. A value is what the flag takes (``hidden=16 16,32``
sweeps ``--hidden 16 16`` and ``--hidden 32``). Every member is a run of its own
in ``<workdir>/members/<name>``, with the numbers, files and checkpoints of that
run alone; members that differ only in values an experiment can vmap (an
injected learning rate or weight decay, the seed) train in one program.
``summary.csv``, ``sweep.png`` and the printed table rank them by their best
validation value (the checkpoint monitor); the best member's best checkpoint is
named. A rerun resumes: finished members are read back, interrupted ones resume.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import shutil
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import tyro

from experiments import _cli

# Fields a sweep may not set: where it writes, and how it is run.
_NOT_SWEPT = {"workdir", "overwrite", "sweep", "distributed", "seeds", "full_batch"}
SWEEP_FILES = ("sweep.json", "summary.csv", "sweep.png", "members")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The sweep flags (they take no prefix)."""

  # FIELD=A,B,C (a grid over every such flag) or FIELD=LO:HI / FIELD=log:LO:HI
  # (a range the random search draws from); repeat it for more fields.
  sweep: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
  sweep_trials: int = 0  # Random search: members drawn (0: the grid).
  sweep_seed: int = 0  # Seeds the random search's draws.


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept field: its path in the config, flag, and values or range."""

  name: str
  path: tuple[str, ...]
  flag: str
  kind: type
  values: tuple[str, ...] = ()
  low: float | None = None
  high: float | None = None
  log: bool = False


def fields(config) -> dict[str, tuple[tuple[str, ...], str, type]]:
  """``{name: (path, flag, type)}`` of the fields a sweep may set; fields of a
  nested config whose flags take no prefix (the optimizer's) by their own name."""
  hints = typing.get_type_hints(type(config), include_extras=True)
  out = {}
  for field in dataclasses.fields(config):
    if field.name in _NOT_SWEPT:
      continue
    value, hint = getattr(config, field.name), hints[field.name]
    if dataclasses.is_dataclass(value):
      flat = tyro.conf.OmitArgPrefixes in getattr(hint, "__metadata__", ())
      for name, (path, flag, kind) in fields(value).items():
        key = name if flat else f"{field.name}.{name}"
        out[key] = ((field.name, *path), flag if flat else f"{field.name}.{flag}", kind)
    else:
      kind = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
      out[field.name] = ((field.name,), field.name.replace("_", "-"), kind)
  return out


def _numeric(kind) -> type | None:
  options = typing.get_args(kind) or (kind,)
  for option in (int, float):
    if option in options and bool not in options:
      return option
  return None


def parse_axes(specs: Sequence[str], config, *, random: bool) -> list[Axis]:
  """The ``--sweep`` specs as axes; a ValueError names a malformed one."""
  known, axes = fields(config), []
  for spec in specs:
    name, sep, text = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not text.strip():
      raise ValueError(f"--sweep {spec!r}: expected FIELD=VALUES, e.g. learning_rate=0.01,0.1 "
                       "or learning_rate=log:0.001:1")
    if name not in known:
      close = [k for k in known if name in k or k in name][:4]
      raise ValueError(f"--sweep {spec!r}: no field {name!r} to sweep"
                       + (f" (did you mean {', '.join(close)}?)" if close else
                          f" (fields: {', '.join(sorted(known))})"))
    if any(a.name == name for a in axes):
      raise ValueError(f"--sweep {spec!r}: {name} is swept twice")
    path, flag, kind = known[name]
    parts = text.split(":")
    if len(parts) in (2, 3) and (len(parts) == 2 or parts[0] == "log"):
      axes.append(_range(spec, name, path, flag, kind, parts, random))
      continue
    values = tuple(v.strip() for v in text.split(","))
    if any(not v for v in values) or len(set(values)) != len(values):
      raise ValueError(f"--sweep {spec!r}: empty or repeated values")
    axes.append(Axis(name, path, flag, kind, values=values))
  return axes


def _range(spec, name, path, flag, kind, parts, random) -> Axis:
  number = _numeric(kind)
  if number is None:
    raise ValueError(f"--sweep {spec!r}: a range needs a numeric field; {name} is {kind}")
  try:
    low, high = (float(p) for p in parts[-2:])
  except ValueError:
    raise ValueError(f"--sweep {spec!r}: range bounds must be numbers") from None
  log = len(parts) == 3
  if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
    raise ValueError(f"--sweep {spec!r}: need LO < HI" + (" and LO > 0 (log)" if log else ""))
  if not random:
    raise ValueError(f"--sweep {spec!r}: a range is drawn from: add --sweep-trials N")
  return Axis(name, path, flag, number, low=low, high=high, log=log)


def _draw(axis: Axis, rng: np.random.Generator) -> str:
  if axis.values:
    return axis.values[int(rng.integers(len(axis.values)))]
  low, high = (math.log(axis.low), math.log(axis.high)) if axis.log else (axis.low, axis.high)
  value = rng.uniform(low, high)
  value = math.exp(value) if axis.log else value
  if axis.kind is int:
    return str(min(max(round(value), math.ceil(axis.low)), math.floor(axis.high)))
  return f"{value:.4g}"


def _args(axis: Axis, value: str) -> list[str]:
  if axis.kind is bool:
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"--sweep {axis.name}={value}: expected true or false")
    return [f"--{axis.flag}" if lowered in ("true", "1", "yes")
            else f"--{axis.flag.rpartition('.')[0] + '.' if '.' in axis.flag else ''}"
                 f"no-{axis.flag.rpartition('.')[2]}"]
  return [f"--{axis.flag}", *value.split()]


def _config(base, assignment: Sequence[tuple[Axis, str]]):
  """``base`` with the swept flags set, checked as the command line checks them."""
  args = [a for axis, value in assignment for a in _args(axis, value)]
  try:
    return _cli.parse_with_default(type(base), args, base)
  except ValueError as error:
    shown = " ".join(f"{axis.name}={value}" for axis, value in assignment)
    raise ValueError(f"--sweep {shown}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  values: dict[str, str]
  config: Any


def members(config) -> list[Member]:
  """The sweep's members (configs checked, nothing written); ValueError if bad."""
  sweep: SweepConfig = config.sweep
  if sweep.sweep_trials < 0:
    raise ValueError(f"--sweep-trials must be >= 0, got {sweep.sweep_trials}")
  if not sweep.sweep:
    raise ValueError("--sweep-trials and --sweep-seed need --sweep FIELD=VALUES")
  for name, refused in (("seeds", 1), ("full_batch", False)):
    if getattr(config, name, refused) != refused:
      raise ValueError(f"--sweep cannot be combined with --{name.replace('_', '-')}")
  base = dataclasses.replace(config, sweep=SweepConfig(), overwrite=False)
  axes = parse_axes(sweep.sweep, base, random=sweep.sweep_trials > 0)
  for axis in axes:  # each value alone, so an error names it
    for value in axis.values:
      _config(base, [(axis, value)])
  if sweep.sweep_trials:
    rng = np.random.default_rng(sweep.sweep_seed)
    points: dict = {}  # distinct, in the order drawn: a repeat is drawn again
    for _ in range(100 * sweep.sweep_trials):
      if len(points) == sweep.sweep_trials:
        break
      points.setdefault(tuple(_draw(a, rng) for a in axes), None)
    points = list(points)
    if len(points) < sweep.sweep_trials:
      raise ValueError(f"--sweep-trials {sweep.sweep_trials} drew only {len(points)} "
                       "distinct members from these values: ask for fewer trials, give more "
                       "values or a range (LO:HI)")
  else:
    points = list(itertools.product(*(a.values for a in axes)))
  out = []
  for i, point in enumerate(points):
    assignment = list(zip(axes, point))
    name = f"{i:02d}-" + "-".join(f"{a.name}={v.replace(' ', 'x').replace('/', '_')}"
                                  for a, v in assignment)
    member = _config(base, assignment)
    out.append(Member(name, {a.name: v for a, v in assignment},
                      dataclasses.replace(member, workdir=config.workdir / "members" / name)))
  return out


def _set(config, path: tuple[str, ...], value):
  if len(path) == 1:
    return dataclasses.replace(config, **{path[0]: value})
  return dataclasses.replace(config, **{path[0]: _set(getattr(config, path[0]), path[1:], value)})


def _get(config, path):
  for name in path:
    config = getattr(config, name)
  return config


def groups(sweep: Sequence[Member], base, vmapped: Sequence[str]) -> list[list[Member]]:
  """Members whose configs differ only in ``vmapped`` fields, in order."""
  known = fields(base)
  paths = [known[n][0] for n in vmapped if n in known]
  out: dict[str, list[Member]] = {}
  for member in sweep:
    key = member.config
    for path in paths:
      key = _set(key, path, _get(base, path))
    out.setdefault(repr(dataclasses.replace(key, workdir=base.workdir)), []).append(member)
  return list(out.values())


def check_directory(config, sweep: Sequence[Member]) -> dict:
  """The sweep's record; refuses a workdir holding another sweep or a run."""
  from jaxtrain.rundir.run import NOT_IDENTITY, RUN_FILES, RunDirError

  workdir = config.workdir
  record = {"sweep": list(config.sweep.sweep), "trials": config.sweep.sweep_trials,
            "seed": config.sweep.sweep_seed,
            "members": {m.name: m.values for m in sweep},
            "base": _cli.to_record(dataclasses.replace(
                config, sweep=SweepConfig(), overwrite=False, epochs=0))}
  if workdir.exists() and not workdir.is_dir():
    raise RunDirError(f"workdir {str(workdir)!r} exists and is not a directory")
  hint = "choose another --workdir or pass --overwrite to replace it"
  if config.overwrite:
    return record
  runs = [n for n in RUN_FILES if (workdir / n).exists()]
  if runs:
    raise RunDirError(f"workdir {str(workdir)!r} holds a run ({', '.join(runs)}), "
                      f"not a sweep; {hint}")
  path = workdir / "sweep.json"
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
      raise RunDirError(f"{str(path)!r} cannot be read ({error}); {hint}") from None
    saved.pop("programs", None)  # how members trained: not the sweep's identity

    def identity(sweep_record):  # as a run's: epochs, cadence etc. may change
      base = {k: v for k, v in sweep_record.get("base", {}).items() if k not in NOT_IDENTITY}
      return {**sweep_record, "base": base}

    if identity(saved) != identity(json.loads(json.dumps(record, default=str))):
      raise RunDirError(f"workdir {str(workdir)!r} holds a different sweep; {hint}")
  elif (workdir / "members").exists():
    raise RunDirError(f"workdir {str(workdir)!r} holds members of an unknown sweep; {hint}")
  return record


def write_record(workdir: pathlib.Path, record: dict) -> None:
  (workdir / "sweep.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def open_directory(config, record: dict) -> None:
  from jaxtrain.rundir.run import RUN_FILES

  workdir = config.workdir
  if config.overwrite:
    for name in (*SWEEP_FILES, *RUN_FILES):
      path = workdir / name
      shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "sweep.json"
  programs = json.loads(path.read_text()).get("programs", {}) if path.exists() else {}
  write_record(workdir, {**record, "programs": programs})


def run(config, main: Callable, *, vmapped: Sequence[str] = ()) -> None:
  """Runs the sweep ``config.sweep`` asks for; ``main`` is the experiment's.

  ``vmapped``: fields whose values only change array values of the state or
  keys (e.g. ``learning_rate`` of a constant-rate optimizer, ``seed``).
  """
  from experiments import _sweep_train

  sweep = members(config)
  record = check_directory(config, sweep)
  if config.overwrite:  # the members' directories go too: check them as new
    sweep = [dataclasses.replace(m, config=dataclasses.replace(m.config, overwrite=True))
             for m in sweep]
  calls = _sweep_train.check(main, sweep)
  sweep = [dataclasses.replace(m, config=dataclasses.replace(m.config, overwrite=False))
           for m in sweep]
  open_directory(config, record)
  base = dataclasses.replace(config, sweep=SweepConfig(), overwrite=False)
  results = _sweep_train.train(groups(sweep, base, vmapped), main, calls)
  if results is not None:
    programs = json.loads((config.workdir / "sweep.json").read_text()).get("programs", {})
    programs.update({n: p for n, (_, p) in results.items() if p != "resumed"})
    results = {n: (r, programs.get(n, p)) for n, (r, p) in results.items()}
    write_record(config.workdir, {**record, "programs": programs})
    from experiments import _sweep_report

    _sweep_report.report(config, sweep, results)
