"""Whether a checkpoint fits the state it is restored into: the same tree of
arrays with the same shapes, and an error naming the first difference."""

from __future__ import annotations

import jax
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint does not match what was asked for (shapes, structure, config)."""


def _name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  # Orbax's metadata stores NamedTuple nodes (optimizer states) as dicts, so
  # paths are compared by their names, not their key types.
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_name(k) for k in path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_compatible(saved, wanted, where: str) -> None:
  """Raises CheckpointError naming the first structural or shape difference."""
  saved_shapes, wanted_shapes = _shapes(saved), _shapes(wanted)
  missing = sorted(set(wanted_shapes) - set(saved_shapes))
  extra = sorted(set(saved_shapes) - set(wanted_shapes))
  if missing or extra:
    raise CheckpointError(
        f"checkpoint {where} does not match the requested model: "
        f"missing {missing[:3]}, unexpected {extra[:3]}")
  # The state's parameters first: a mismatch there is the one a reader
  # recognises (the best epoch's copy of them would repeat it).
  for path in sorted(wanted_shapes, key=lambda p: ("params" not in p.split("/"),
                                                   not p.startswith("state/"), p)):
    shape = wanted_shapes[path]
    if saved_shapes[path] != shape:
      raise CheckpointError(
          f"checkpoint {where} does not match the requested model: {path} has shape "
          f"{saved_shapes[path]} in the checkpoint but {shape} in the model")
