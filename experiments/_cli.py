"""Command-line plumbing shared by the experiments: parse, run, fail in one line.

Bad input ends with exit status 2 and one line on stderr naming the offending
argument or file, without a traceback (set ``JAXTRAIN_DEBUG=1`` for one); a run
that diverged (a non-finite loss or gradient stopped it) ends with exit status 3;
a run that could not write (a full, failing or read-only disk after it started)
ends with exit status 4, its last checkpoint intact; a run whose callback raised
ends with exit status 1 and its one line, after a checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import tyro

T = TypeVar("T")
DIVERGED = 3  # the exit status of a run stopped by a non-finite loss or gradient
WRITE_FAILED = 4  # the exit status of a run whose checkpoint or logs could not be written


def _one_line(tyro_output: str) -> str:
  """tyro's error box as one line: the message between the title and a rule."""
  # Box characters are Unicode, or ASCII when stdout cannot encode them.
  blocks, block = [], []
  for line in tyro_output.splitlines():
    line = line.strip(" │╭╮╰╯|+\t")
    if line and set(line) <= set("─-"):
      blocks.append(block)
      block = []
    elif line:
      block.append(line)
  blocks = [b for b in blocks + [block] if b]
  if not blocks:
    return "invalid arguments"
  title, *message = blocks[0]
  if not message and len(blocks) > 1:
    message = blocks[1]
  return " ".join(message) or title.strip("─- ")


SEED_LIMIT = 2**32  # jax.random.key(seed) keeps the low 32 bits: larger seeds alias smaller ones


def _empty_value(args: list[str]) -> str | None:
  """The first flag given an empty value (``--workdir ""``, ``--data-dir=``)."""
  for i, arg in enumerate(args):
    if not arg.startswith("--"):
      continue
    flag, eq, value = arg.partition("=")
    if (eq and not value) or (not eq and i + 1 < len(args) and args[i + 1] == ""):
      return flag
  return None


def check_values(config, prefix: str = "--") -> None:
  """Refuses values no flag means, naming the flag: NaN, an integer beyond
  int64, a seed outside 0..2**32-1 (JAX keys keep 32 bits of it, so larger or
  negative seeds would repeat smaller ones' runs)."""
  import dataclasses
  import math
  import typing

  hints = typing.get_type_hints(type(config), include_extras=True)
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    flag = prefix + field.name.replace("_", "-")
    if dataclasses.is_dataclass(value):
      flat = tyro.conf.OmitArgPrefixes in getattr(hints[field.name], "__metadata__", ())
      check_values(value, prefix if flat else flag + ".")
      continue
    if field.name.endswith("seed") and isinstance(value, int) and not (
        0 <= value < SEED_LIMIT):
      raise ValueError(f"{flag} must be in 0..{SEED_LIMIT - 1} (JAX keys keep 32 bits), "
                       f"got {value}")
    for item in value if isinstance(value, tuple) else (value,):
      if isinstance(item, float) and math.isnan(item):
        raise ValueError(f"{flag} must be a number, got nan")
      if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
        raise ValueError(f"{flag} {item} is out of range (at most 2**63 - 1 in magnitude)")


def parse(config_type: type[T], args: list[str] | None = None) -> T:
  """Parses flags into ``config_type``; on error prints one line, exits 2."""
  captured = io.StringIO()
  empty = _empty_value(sys.argv[1:] if args is None else args)
  if empty is not None:
    fail(f"{empty} needs a value, got an empty string")
  try:
    with contextlib.redirect_stderr(captured):
      config = tyro.cli(config_type, args=args)
    check_values(config)
    return config
  except SystemExit as exit_:
    if exit_.code in (0, None):
      raise
    fail(_one_line(captured.getvalue()))
  except ValueError as error:  # a config's own check of a flag's value
    fail(str(error).splitlines()[0])


def parse_with_default(config_type: type[T], args: list[str], default: T) -> T:
  """Parses flags over ``default``'s values; a bad one raises a one-line ValueError."""
  captured = io.StringIO()
  try:
    with contextlib.redirect_stderr(captured):
      config = tyro.cli(config_type, args=args, default=default)
    check_values(config)
    return config
  except SystemExit:
    raise ValueError(_one_line(captured.getvalue())) from None
  except ValueError as error:
    raise ValueError(str(error).splitlines()[0]) from None


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def main(config_type: type[T], run: Callable[[T], object], args: list[str] | None = None):
  """Parses the flags and runs; a ``ValueError`` (bad input) exits 2 in one line."""
  config = parse(config_type, args)
  if not os.environ.get("JAXTRAIN_DEBUG"):
    import threading
    import warnings

    # A fallback (a damaged checkpoint skipped) is one line, not file:line and source.
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    # A writer thread's failure (TensorBoard's on a full disk) is one line; the
    # run's own write fails next and says what it means.
    threading.excepthook = lambda hook: print(
        f"warning: {hook.thread.name if hook.thread else 'a thread'} stopped: "
        f"{hook.exc_type.__name__}: {hook.exc_value}", file=sys.stderr)
  try:
    from jaxtrain.engine import distributed
    from jaxtrain.engine.cache import enable_compilation_cache

    if getattr(config, "distributed", None) is not None:
      if distributed.initialize(config.distributed) and not distributed.is_primary():
        # Process 0 reports (its summary, its stop messages); the others' stdout
        # (gloo's C++ lines included) would repeat it. Their stderr stays.
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    enable_compilation_cache()  # a second run starts compiled ($JAXTRAIN_CACHE_DIR)
    from experiments._sweep_train import observe

    results = observe(run, config)  # every run() call's result: a divergence exits 3
  except (ValueError, FileNotFoundError, NotADirectoryError) as error:
    if os.environ.get("JAXTRAIN_DEBUG"):
      raise
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  except RuntimeError as error:  # a callback raised: the run saved, then ends in one line
    from jaxtrain.train.callbacks import CallbackError

    if not isinstance(error, CallbackError) or os.environ.get("JAXTRAIN_DEBUG"):
      raise
    print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
    raise SystemExit(1) from None
  except OSError as error:  # a failed save names its checkpoints; a log write, its errno
    if os.environ.get("JAXTRAIN_DEBUG"):
      raise
    import errno

    from jaxtrain.rundir.integrity import CheckpointSaveError

    if isinstance(error, CheckpointSaveError):
      message = str(error).splitlines()[0]
    elif error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO):
      message = (f"writing the run failed ({error}); its checkpoints so far are intact: "
                 "fix the disk and run the same command to resume")
    else:  # not a write of the run: reading the data, connecting to the other processes
      fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(WRITE_FAILED) from None
  diverged = [r.stop_reason for r in results if (r.stop_reason or "").startswith("non-finite")]
  if diverged and not getattr(getattr(config, "sweep", None), "sweep", ()):
    print(f"error: training diverged: {diverged[0]}; metrics.csv keeps the epochs before it",
          file=sys.stderr)
    raise SystemExit(DIVERGED)


def command(config_type: type[T], run: Callable[[T], object]) -> None:
  """``main`` for ``python -m experiments.NAME``: runs, then exits at once.

  Every file the run writes is closed and every checkpoint committed before
  ``run`` returns; what is left is the interpreter tearing down JAX, XLA and
  Orbax objects, about 0.4 s for a two-second experiment. After the exit
  handlers (logging, JAX, Orbax) the process ends without it.
  """
  import atexit

  try:
    main(config_type, run)
    code = 0
  except SystemExit as exit_:  # an error said in one line: end without waiting on threads
    code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    if isinstance(exit_.code, str):
      print(exit_.code, file=sys.stderr)
    _exit_within(10.0, code)
  except BaseException:  # a traceback (a bug): printed, then the exit is not held either
    _exit_within(10.0, 1)
    raise
  sys.stdout.flush()
  sys.stderr.flush()
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _exit_within(seconds: float, code: int) -> None:
  """Ends the process after ``seconds`` whatever is still running: a thread
  left blocked by a failure (a writer on a full disk) must not hold the exit."""
  import threading

  timer = threading.Timer(seconds, os._exit, (code,))
  timer.daemon = True
  timer.start()


def to_record(config) -> dict:
  """A config as config.json holds it: the fields as the command line names
  them, so a nested config whose flags take no prefix (the optimizer's) is
  flat, as it was before it nested (older run directories stay the same run).
  :func:`from_record` reads both forms."""
  import dataclasses
  import typing

  hints = typing.get_type_hints(type(config), include_extras=True)
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.metadata.get("recorded_when_set") and value == field.default:
      continue  # a flag added later: at its default, older runs are the same run
    flat = tyro.conf.OmitArgPrefixes in getattr(hints[field.name], "__metadata__", ())
    if dataclasses.is_dataclass(value) and flat:
      out.update(to_record(value))
    elif dataclasses.is_dataclass(value):
      out[field.name] = to_record(value)
    else:
      out[field.name] = value
  return out


def added_flag(default, **kwargs):
  """A config field added after runs were recorded without it: config.json
  names it only when it is set, so those run directories stay the same run."""
  import dataclasses

  return dataclasses.field(default=default, metadata={"recorded_when_set": True}, **kwargs)


def from_record(config_type: type[T], values: dict, defaults: T | None = None) -> T:
  """Rebuilds a config dataclass from its JSON form in ``config.json``; missing
  keys keep ``defaults`` (the class's defaults when None)."""
  import dataclasses
  import pathlib

  defaults = config_type() if defaults is None else defaults
  kwargs = {}
  for field in dataclasses.fields(config_type):
    default = getattr(defaults, field.name)
    value = values.get(field.name)
    if dataclasses.is_dataclass(default):
      if field.name not in values:
        # A config.json written before this field nested its values (older
        # runs' flat optimizer keys): they stand at this level.
        value = {f.name: values[f.name] for f in dataclasses.fields(default)
                 if f.name in values}
      if isinstance(value, dict):
        kwargs[field.name] = from_record(type(default), value, default)
      continue
    if field.name not in values:
      continue
    if isinstance(value, str) and "Path" in str(field.type):
      value = pathlib.Path(value)
    elif isinstance(default, tuple) and isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return dataclasses.replace(defaults, **kwargs)


def builder(module_globals: dict, function: str) -> str:
  """``"module:function"`` naming ``function`` of the experiment module whose
  globals are given (also under ``python -m``, where ``__name__`` is
  ``"__main__"``, and for ``python experiments/NAME.py``): written into
  config.json so that ``checkpoint.load`` rebuilds a run's state without being
  told which experiment made it."""
  import pathlib

  spec = module_globals.get("__spec__")
  name = spec.name if spec is not None else (
      f"experiments.{pathlib.Path(module_globals['__file__']).stem}")
  return f"{name}:{function}"
