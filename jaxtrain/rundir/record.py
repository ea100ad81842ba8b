"""``config.json``: a run's resolved config and its environment, as JSON."""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import pathlib
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np

_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                  "jaxtrain")


def jsonable(obj: Any, *, absolute: bool = False) -> Any:
  """Converts configs (dataclasses, tuples, paths, numpy, enums) to JSON;
  ``absolute``: paths (``os.PathLike`` values) as absolute paths."""
  def convert(value):
    return jsonable(value, absolute=absolute)

  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {str(k): convert(v) for k, v in obj.items()}
  if isinstance(obj, enum.Enum):
    return convert(obj.value)
  if isinstance(obj, (str, bool, int, float)) or obj is None:
    return obj
  if isinstance(obj, (list, tuple)):
    return [convert(v) for v in obj]
  if isinstance(obj, (set, frozenset)):
    return sorted((convert(v) for v in obj), key=repr)
  if isinstance(obj, os.PathLike):
    return os.path.abspath(obj) if absolute else os.fspath(obj)
  if isinstance(obj, (np.ndarray, np.generic)):
    return jsonable(obj.tolist())
  return getattr(obj, "__name__", None) or repr(obj)  # Functions, classes, ...


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


#: Keys config.json gives the environment; a run's own record may not use them.
RESERVED = ("versions", "backend", "devices")


def check_record(config: Any) -> None:
  """Raises ValueError if ``config`` uses a key reserved for the environment
  (checked before a run writes anything)."""
  out = jsonable(config)
  if not isinstance(out, dict):
    raise TypeError(f"config must be a dict or dataclass, got {type(config)}")
  if clash := sorted(set(out) & set(RESERVED)):
    raise ValueError(f"config keys {clash} are reserved for environment info")


def write_config(workdir: str | os.PathLike, config: Any) -> None:
  """Writes ``config.json``: the resolved config plus the environment.

  The config's keys (sorted, indent 2) are at the top level (paths made
  absolute: a rerun from another directory names the same files), next to
  ``"versions"`` (python, jax, jaxlib, flax, optax, orbax-checkpoint, numpy,
  jaxtrain), ``"backend"`` and ``"devices"`` (kind, count, local_count,
  process_count).

  Args:
    workdir: Run directory (created).
    config: A dict or dataclass; tuples, paths, enums and numpy values are
      converted, anything else is written as its name or ``repr``.

  Example:
    >>> import pathlib, tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_config(d, {"lr": 0.1, "sizes": (2, 3), "data": pathlib.Path("x")})
    >>> c = json.load(open(os.path.join(d, "config.json")))
    >>> c["lr"], c["sizes"], c["data"] == os.path.abspath("x"), sorted(c["versions"])[:3]
    (0.1, [2, 3], True, ['flax', 'jax', 'jaxlib'])
  """
  import jax

  out = jsonable(config, absolute=True)
  if not isinstance(out, dict):
    raise TypeError(f"config must be a dict or dataclass, got {type(config)}")
  env = {
      "versions": {"python": platform.python_version(),
                   **{name: _version(name) for name in _DISTRIBUTIONS}},
      "backend": jax.default_backend(),
      "devices": {"kind": jax.devices()[0].device_kind,
                  "count": jax.device_count(),
                  "local_count": jax.local_device_count(),
                  "process_count": jax.process_count()},
  }
  check_record(out)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:  # Atomic: a crash leaves the old file.
    json.dump({**out, **env}, f, sort_keys=True, indent=2)
    f.write("\n")
  os.replace(path + ".tmp", path)


# -- reading a run's record back and comparing it --------------------------------

# Settings that may change between a run and its resumption.
NOT_IDENTITY = {"epochs", "overwrite", "workdir", "progress", "checkpoint", "versions",
                "backend", "devices_info", "every_epochs", "every_steps", "every_seconds",
                "build", "distributed", "data", "profile_steps", "summary", "track"}


def _identity(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in record.items():
    if key in NOT_IDENTITY or (not prefix and key in RESERVED):
      continue
    if isinstance(value, Mapping):
      flat.update(_identity(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _same_path(saved: Any, wanted: Any) -> bool:
  """Whether a recorded value and this run's name one file or folder: the same
  existing one, or (a run recorded before paths were written absolute) a
  relative path that, taken from here, is this run's absolute one."""
  if not (isinstance(saved, str) and isinstance(wanted, str) and saved and wanted):
    return False
  if not os.path.isabs(saved) and os.path.isabs(wanted) and os.path.abspath(saved) == wanted:
    return True
  try:
    return os.path.samefile(saved, wanted)
  except OSError:  # either does not exist (or is not a path at all)
    return False


def differences(saved: Mapping[str, Any], record: Mapping[str, Any],
                added: Mapping[str, Any] | None = None) -> list[str]:
  """How ``record`` (a run about to start) differs from the ``saved`` one, in
  what identifies a run: ``["key: saved there, wanted now", ...]``. ``added``:
  flattened keys added since runs were saved, with their defaults (at its
  default, such a key missing from ``saved`` is the behaviour the run had)."""
  saved, added = _identity(saved), added or {}
  wanted = _identity(json.loads(json.dumps(jsonable(dict(record), absolute=True))))
  return [f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now"
          for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)
          and not (key not in saved and key in added and wanted[key] == added[key])
          and not _same_path(saved.get(key), wanted.get(key))]


def read_config(path: str | os.PathLike) -> tuple[dict | None, str | None]:
  """A run's ``config.json``: ``(record, None)``, or ``(None, what is wrong)``
  when it is missing or damaged ("missing", "not valid JSON (...)")."""
  try:
    text = pathlib.Path(path).read_bytes()
  except FileNotFoundError:
    return None, "missing"
  except OSError as error:
    return None, f"unreadable ({error.strerror or error})"
  try:
    record = json.loads(text)
  except ValueError as error:  # also UnicodeDecodeError: garbage bytes
    return None, f"not valid JSON ({str(error).splitlines()[0][:80]})"
  if not isinstance(record, dict):
    return None, f"not valid JSON (a {type(record).__name__}, not an object)"
  return record, None


def checkpoint_record(workdir: str | os.PathLike) -> tuple[dict | None, int | None]:
  """The run record (config.json without its environment) that the latest
  readable checkpoint of ``workdir`` holds, with its step: ``(None, None)``
  when none holds one (written before checkpoints carried it, or by
  ``checkpoint.save``). Reads only; changes nothing."""
  from jaxtrain.rundir import integrity
  from jaxtrain.rundir.checkpointer import DIRECTORY, Checkpointer

  if not (pathlib.Path(workdir) / DIRECTORY).is_dir():
    return None, None
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    for step in checkpointer.steps()[::-1]:
      try:
        meta = checkpointer.read_meta(step)
        integrity.check_digest(meta)
      except Exception:  # noqa: BLE001 - a damaged checkpoint: try the previous
        continue
      record = meta.get("record")
      return (record, step) if isinstance(record, dict) else (None, None)
  finally:
    checkpointer.close()
  return None, None
