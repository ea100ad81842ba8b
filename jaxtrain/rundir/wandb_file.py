"""Reading a Weights & Biases run file (``run-<id>.wandb``) without W&B's servers.

An offline (or not yet synced) W&B run keeps everything it logged in one file:
a LevelDB-style log of 32 KiB blocks (the header ``:W&B``, magic ``0xBEE1``, a
version byte) whose records are W&B's own ``Record`` protocol buffers. The
``wandb`` package no longer ships a reader; this one reads the history rows,
which is what :class:`~jaxtrain.rundir.trackers.WandbTracker` needs to log each
step exactly once across the sessions of a resumed run, and what tests compare
with ``metrics.csv``. A torn or damaged tail (a killed writer) ends the read.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator

__all__ = ["history", "last_steps", "records"]

_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_RECORD = struct.Struct("<IHB")  # crc32 of kind + data, length, kind
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | os.PathLike) -> Iterator[bytes]:
  """The serialized ``Record`` messages of a ``.wandb`` file, in order; stops
  at the first torn or damaged one.

  Raises:
    ValueError: the file is not a W&B run file (naming it).
  """
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < _HEADER.size or _HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
    raise ValueError(f"{os.fspath(path)} is not a W&B run file")
  pos, pending = _HEADER.size, None
  while True:
    left = _BLOCK - pos % _BLOCK
    if left < _RECORD.size:  # a block's tail too short for a header is padding
      pos += left
      continue
    if pos + _RECORD.size > len(data):
      return
    crc, length, kind = _RECORD.unpack_from(data, pos)
    body = data[pos + _RECORD.size: pos + _RECORD.size + length]
    if len(body) < length or zlib.crc32(bytes([kind]) + body) != crc:
      return
    pos += _RECORD.size + length
    if kind == _FULL:
      yield body
    elif kind == _FIRST:
      pending = body
    elif kind in (_MIDDLE, _LAST) and pending is not None:
      pending += body
      if kind == _LAST:
        yield pending
        pending = None
    else:
      return


def history(path: str | os.PathLike) -> Iterator[dict]:
  """The history rows a ``.wandb`` file holds: ``{"_step": int, name: value}``
  with values as W&B stored them (JSON-decoded)."""
  from wandb.proto import wandb_internal_pb2  # Lazy: the optional tracker's package.

  for body in records(path):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(body)
    if record.WhichOneof("record_type") != "history":
      continue
    row = {}
    for item in record.history.item:
      key = item.key or "/".join(item.nested_key)
      row[key] = json.loads(item.value_json)
    yield row


def last_steps(paths) -> dict[str, int]:
  """Name -> the last step at which the run files ``paths`` hold it (a
  histogram's or an image's parts, ``<name>/_type`` and so on, count as
  ``<name>``)."""
  last: dict[str, int] = {}
  for path in paths:
    for row in history(path):
      step = row.get("_step")
      for key in row:
        if not key.startswith("_") and step is not None:
          key = key[:-len("/_type")] if key.endswith("/_type") else key
          last[key] = max(last.get(key, -1), int(step))
  return last
