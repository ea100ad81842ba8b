"""Command-line plumbing shared by the experiments: parse, run, fail in one line.

Bad input ends with exit status 2 and one line on stderr naming the offending
argument or file, without a traceback (set ``JAXTRAIN_DEBUG=1`` for one).
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


def _one_line(tyro_output: str) -> str:
  # tyro draws a box: a title, the (possibly wrapped) message, a rule, help.
  lines = [line.strip(" │╭╮╰╯\t") for line in tyro_output.splitlines()]
  lines = [line for line in lines if line]
  message = []
  for line in lines[1:]:
    if set(line) <= set("─"):
      break
    message.append(line)
  return " ".join(message) or (lines[0] if lines else "invalid arguments")


def parse(config_type: type[T], args: list[str] | None = None) -> T:
  """Parses flags into ``config_type``; on error prints one line, exits 2."""
  captured = io.StringIO()
  try:
    with contextlib.redirect_stderr(captured):
      return tyro.cli(config_type, args=args)
  except SystemExit as exit_:
    if exit_.code in (0, None):
      raise
    fail(_one_line(captured.getvalue()))


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def main(config_type: type[T], run: Callable[[T], object], args: list[str] | None = None):
  """Parses the flags and runs; a ``ValueError`` (bad input) exits 2 in one line."""
  config = parse(config_type, args)
  try:
    from jaxtrain.cache import enable_compilation_cache

    enable_compilation_cache()  # a second run starts compiled ($JAXTRAIN_CACHE_DIR)
    run(config)
  except (ValueError, FileNotFoundError, NotADirectoryError) as error:
    if os.environ.get("JAXTRAIN_DEBUG"):
      raise
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


def from_record(config_type: type[T], values: dict) -> T:
  """Rebuilds a config dataclass from its JSON form in ``config.json``."""
  import dataclasses
  import pathlib

  kwargs = {}
  defaults = config_type()
  for field in dataclasses.fields(config_type):
    if field.name not in values:
      continue
    value, default = values[field.name], getattr(defaults, field.name)
    if dataclasses.is_dataclass(default) and isinstance(value, dict):
      value = from_record(type(default), value)
    elif isinstance(default, pathlib.Path):
      value = pathlib.Path(value)
    elif isinstance(default, tuple) and isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return config_type(**kwargs)
