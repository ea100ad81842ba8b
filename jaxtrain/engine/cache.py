"""JAX's persistent compilation cache, on by default for runs.

A second run of an experiment loads its compiled programs from disk instead of
compiling them again. The cache lives in ``$JAXTRAIN_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxtrain/jax`` (``~/.cache/jaxtrain/jax``); set
``JAXTRAIN_CACHE_DIR=off`` to disable it.
"""

from __future__ import annotations

import os
import pathlib

import jax


def default_cache_dir() -> str | None:
  """The configured cache directory, or None when disabled."""
  configured = os.environ.get("JAXTRAIN_CACHE_DIR")
  if configured is not None:
    return None if configured.lower() in ("", "off", "0", "none") else configured
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return str(pathlib.Path(base) / "jaxtrain" / "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
  """Turns on the persistent compilation cache; returns its directory.

  Args:
    path: the directory; default :func:`default_cache_dir`.

  Returns:
    The directory used, or None when caching is disabled.

  >>> import os
  >>> os.environ["JAXTRAIN_CACHE_DIR"] = "off"
  >>> print(default_cache_dir())
  None
  >>> del os.environ["JAXTRAIN_CACHE_DIR"]
  """
  path = os.fspath(path) if path is not None else default_cache_dir()
  if path is None:
    return None
  if jax.config.jax_compilation_cache_dir == path:
    return path
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Our programs compile in well under JAX's default 1 s threshold, and those
  # small compiles are exactly what makes a short run slow to start.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
