"""``config.json``: a run's resolved config and its environment, as JSON."""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np

_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                  "jaxtrain")


def jsonable(obj: Any) -> Any:
  """Converts configs (dataclasses, tuples, paths, numpy, enums) to JSON."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, enum.Enum):
    return jsonable(obj.value)
  if isinstance(obj, (str, bool, int, float)) or obj is None:
    return obj
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (set, frozenset)):
    return sorted((jsonable(v) for v in obj), key=repr)
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
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

  The config's keys (sorted, indent 2) are at the top level, next to
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
    >>> c["lr"], c["sizes"], c["data"], sorted(c["versions"])[:3]
    (0.1, [2, 3], 'x', ['flax', 'jax', 'jaxlib'])
  """
  import jax

  out = jsonable(config)
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
