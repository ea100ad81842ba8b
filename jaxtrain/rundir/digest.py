"""A checkpoint's arrays tied to its step and its run: the SHA-256 its meta records.

Each checkpoint's JSON meta (itself hashed, see :mod:`jaxtrain.rundir.integrity`)
records :data:`KEY`: the SHA-256 of the checkpoint's step, the run it belongs to
(its ``seed`` and ``run_key``, the same for every resume of one run, different
for another seed) and every array it saved: each leaf's path, dtype, shape and
bytes, in the order of the paths. Arrays copied in from another step's
checkpoint, or from another run's, or damaged without failing to read, no
longer match it: the checkpoint reads as damaged.

The arrays are read on the host as they are saved and as they are restored.
In a run of several processes the state is replicated, so every process reads
the same full values; an array no process holds whole (sharded across
processes) has no digest: such a checkpoint is saved without one, and a
checkpoint restored that way is not checked, the same on every process.
Checkpoints written before the digest (none recorded) are not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

KEY = "arrays_sha256"  # where a checkpoint's meta records the digest of its arrays
RUN = ("seed", "run_key")  # the meta entries naming the run the arrays belong to
PARALLEL_BYTES = 1 << 22  # from 4 MiB of arrays on, leaves are hashed on several threads


def _name(key) -> str:
  # Orbax restores NamedTuple nodes (optimizer states) as dicts: a path is its names.
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _host(leaf) -> np.ndarray | None:
  """A leaf's full value on this host, in the dtype JAX gives it (None when
  this process does not hold it whole)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.is_fully_replicated and leaf.sharding.has_addressable_devices:
      leaf = leaf.addressable_data(0)  # one device's copy (not cached on the state)
    elif not leaf.is_fully_addressable:
      return None
  value = np.asarray(leaf)
  dtype = jax.dtypes.canonicalize_dtype(value.dtype)
  return value if value.dtype == dtype else value.astype(dtype)


def _leaf_digest(item: tuple[str, np.ndarray]) -> bytes:
  path, value = item
  sha = hashlib.sha256(f"{path}\0{value.dtype.name}\0{value.shape}".encode())
  sha.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
  return sha.digest()


def arrays_digest(arrays: Any, step: int, meta: dict) -> str | None:
  """The SHA-256 of ``arrays`` (a tree) at ``step`` of the run ``meta`` names
  (its :data:`RUN` entries); None when an array is not held whole here.

  It hashes the step and run, then each leaf's SHA-256 (of its path, dtype,
  shape and bytes) in the order of the paths; the leaves of a large tree are
  hashed on several threads (hashlib releases the GIL)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(arrays)
  leaves = {"/".join(_name(k) for k in path): leaf for path, leaf in flat}
  values = [(path, _host(leaves[path])) for path in sorted(leaves)]
  if any(value is None for _, value in values):
    return None
  run = {name: meta.get(name) for name in RUN}
  sha = hashlib.sha256(json.dumps({"step": int(step), "run": run}, sort_keys=True).encode())
  if sum(value.nbytes for _, value in values) < PARALLEL_BYTES:
    digests = list(map(_leaf_digest, values))
  else:
    with ThreadPoolExecutor(min(len(values), os.cpu_count() or 1, 8)) as pool:
      digests = list(pool.map(_leaf_digest, values))
  for leaf in digests:
    sha.update(leaf)
  return sha.hexdigest()


def _dtypes(tree) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_name(k) for k in path):
          jax.dtypes.canonicalize_dtype(leaf.dtype, allow_extended_dtype=True)
          for path, leaf in flat if hasattr(leaf, "dtype")}


def check_arrays(arrays: Any, step: int, meta: dict, saved: Any = None) -> None:
  """Raises ValueError when the restored ``arrays`` of checkpoint ``step`` are
  not the ones its ``meta`` records a digest of. Not checked: a checkpoint
  recording none, and arrays restored into other dtypes than ``saved`` (the
  checkpoint's array metadata) names, which no longer have the saved bytes."""
  wanted = meta.get(KEY)
  if wanted is None:
    return
  if saved is not None:
    restored, written = _dtypes(arrays), _dtypes(saved)
    if any(written.get(path, dtype) != dtype for path, dtype in restored.items()):
      return
  found = arrays_digest(arrays, step, meta)
  if found is not None and found != wanted:
    raise ValueError(f"its arrays do not match the SHA-256 its meta records for step {step} "
                     "of this run (copied from another checkpoint or run, or damaged)")
