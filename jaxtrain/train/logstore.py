"""What a checkpoint keeps of a run's logs: a count and a digest, not the lines.

A run's logs grow with it: ``steps.jsonl`` (a line per step) and the epoch rows
(``metrics.csv``). A checkpoint holding them would grow too, and every save would
write them all again. So a checkpoint's JSON holds, per log, only
``{"records": n, "sha256": <SHA-256 of its first n lines>}`` (:meth:`LogWriter.save`),
and the lines go once into segments shared by every checkpoint of the run:
``<checkpoints>/logs/<log>.<first line>-<last line>.z`` (zlib text, written whole
under a temporary name and renamed, before the checkpoint that counts them; never
changed). A resume keeps a file whose first ``n`` lines match the digest, and
otherwise reads the lines back from a chain of segments that does
(:func:`read_back`): after a kill, a damaged file, an edited line or a deleted one.
Every save ends a segment at its line count, so a checkpoint's lines are a chain of
segments ending there; a resume removes the segments past its counts (:func:`prune`:
written after that checkpoint by a run whose later checkpoints are gone).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

FOLDER = "logs"  # the segments' folder in a checkpoint directory
PENDING = 16_384  # lines a writer holds before it writes them as a segment
_SEGMENT = re.compile(r"(?P<log>\w+)\.(?P<first>\d+)-(?P<last>\d+)\.z")
_TEMPORARY = re.compile(r"\.\w+\.\d+-\d+\.z\.\d+")  # a segment being written


def reference(records: int, hasher) -> dict:
  """A checkpoint's record of a log: its line count and their SHA-256."""
  return {"records": records, "sha256": hasher.hexdigest() if hasher is not None else None}


def is_reference(value) -> bool:
  """Whether a checkpoint's log entry is a :func:`reference` (else an older
  checkpoint's lines themselves, or nothing)."""
  return isinstance(value, dict) and "records" in value


@dataclasses.dataclass(frozen=True)
class Segment:
  """A segment file: lines ``first..last`` of its log."""

  path: pathlib.Path
  first: int  # 1-based line numbers, inclusive
  last: int

  def text(self) -> str:
    """The segment's lines; ValueError when it is damaged."""
    try:
      text = zlib.decompress(self.path.read_bytes()).decode()
    except (OSError, zlib.error, UnicodeDecodeError) as error:
      raise ValueError(f"{self.path} does not read back ({type(error).__name__})") from None
    if text.count("\n") != self.last - self.first + 1 or not text.endswith("\n"):
      raise ValueError(f"{self.path} does not hold lines {self.first}-{self.last}")
    return text


def segments(folder: pathlib.Path, log: str) -> list[Segment]:
  """The segments of ``log`` in ``folder``."""
  try:
    names = os.listdir(folder)
  except OSError:
    return []
  found = [(m, name) for name in names if (m := _SEGMENT.fullmatch(name))]
  return [Segment(folder / name, int(m["first"]), int(m["last"])) for m, name in found
          if m["log"] == log and int(m["first"]) <= int(m["last"])]


def prune(folder: pathlib.Path, counts: dict[str, int]) -> None:
  """Removes the segments of each log ``{log: count}`` past its count, and
  segments left half-written by a kill."""
  for log, count in counts.items():
    for segment in segments(folder, log):
      if segment.last > count:
        segment.path.unlink(missing_ok=True)
  for name in os.listdir(folder) if folder.is_dir() else ():
    if _TEMPORARY.fullmatch(name):
      (folder / name).unlink(missing_ok=True)


def chain(found: Iterable[Segment], records: int) -> list[Segment] | None:
  """Segments that hold lines 1..``records`` in order, or None: a search over
  their line ranges (their names)."""
  starting = collections.defaultdict(list)
  for segment in found:
    starting[segment.first].append(segment)
  came: dict[int, tuple[int, Segment] | None] = {0: None}
  todo = [0]
  while todo and records not in came:
    done = todo.pop()
    for segment in starting.get(done + 1, ()):
      if segment.last <= records and segment.last not in came:
        came[segment.last] = (done, segment)
        todo.append(segment.last)
  if records not in came:
    return None
  path, at = [], records
  while came[at] is not None:
    at, segment = came[at]
    path.append(segment)
  return path[::-1]


def read_back(folder: pathlib.Path, log: str, ref: dict):
  """``(hasher, texts)`` for the first ``ref["records"]`` lines of ``log`` from
  the segments in ``folder``: ``texts()`` yields them segment by segment,
  ``hasher`` is their SHA-256 (it matches ``ref``); None when no chain of
  readable segments matches."""
  records, found = ref["records"], segments(folder, log)
  while (path := chain(found, records)) is not None:
    hasher = hashlib.sha256()
    try:
      for segment in path:
        hasher.update(segment.text().encode())
    except ValueError:
      found = [s for s in found if s.path != segment.path]  # try without it
      continue
    if ref.get("sha256") is None or hasher.hexdigest() != ref["sha256"]:
      return None

    def texts(path=path) -> Iterator[str]:
      for segment in path:
        yield segment.text()

    return hasher, texts
  return None


def write_segment(folder: pathlib.Path, log: str, first: int, lines: list[str]) -> None:
  """Writes lines ``first..`` of ``log`` as one segment (atomically)."""
  if not lines:
    return
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{log}.{first:012d}-{first + len(lines) - 1:012d}.z"
  temporary = folder / f".{path.name}.{os.getpid()}"  # removed by prune() if left
  temporary.write_bytes(zlib.compress("".join(lines).encode(), 6))
  os.replace(temporary, path)


class LogWriter:
  """One log as checkpoints count it: its lines so far (a count, a running
  SHA-256) and those no segment holds yet.

  Args:
    log: the log's name (``steps``, ``rows``).
    records: lines already in the log (a resumed run's).
    hasher: their SHA-256 (a ``hashlib`` object); None when unknown (a damaged
      log: checkpoints then record no digest, and a resume warns).
  """

  def __init__(self, log: str, records: int = 0, hasher=None):
    self.log, self.records, self.start = log, records, records
    self.hasher = hasher if hasher is not None or records else hashlib.sha256()
    self.folder: pathlib.Path | None = None  # set by the first save
    self.pending: list[str] = []  # lines after those in segments (once folder is set)

  def add(self, lines: list[str]) -> None:
    """Appends lines (each ending in a newline)."""
    if not lines:
      return
    if self.hasher is not None:
      self.hasher.update("".join(lines).encode())
    self.records += len(lines)
    if self.folder is not None:
      self.pending += lines
      if len(self.pending) >= PENDING:  # bounded between saves
        self._write()

  def save(self, folder: pathlib.Path | None, source: Callable[[int], Iterable[str]]
           ) -> dict:
    """Writes the lines no segment holds yet into ``folder``; returns the
    checkpoint's :func:`reference`. ``source(n)`` yields the log's lines after
    its first ``n``: the first save reads those before it from there (the
    resumed ones too, when no segments hold them). ``folder`` None: the
    reference only (a process that does not write the checkpoint's files)."""
    if folder is None:
      return reference(self.records, self.hasher)
    folder = pathlib.Path(folder)
    if self.folder != folder:
      self.folder, self.pending = folder, []
      done = self.start if chain(segments(folder, self.log), self.start) is not None else 0
      piece = []
      for line in itertools.islice(source(done), self.records - done):
        piece.append(line)
        if len(piece) == PENDING:
          write_segment(folder, self.log, done + 1, piece)
          done, piece = done + len(piece), []
      self.pending = piece
    self._write()
    return reference(self.records, self.hasher)

  def _write(self) -> None:
    write_segment(self.folder, self.log, self.records - len(self.pending) + 1, self.pending)
    self.pending = []


def row_line(row) -> str:
  """An epoch row as a line of the ``rows`` log (JSON: floats exact, NaN kept)."""
  return json.dumps(row) + "\n"


class RowLog(LogWriter):
  """The epoch rows as checkpoints count them: a JSON line per row, added as
  the run completes them (:meth:`add_rows`), their segments written into
  ``folder`` (None: none are written, as by a process other than the first,
  or without checkpoints). ``missing``: rows counted that did not read back
  on a resume (the checkpoints then record no digest, and no segments)."""

  def __init__(self, records: int = 0, hasher=None, folder: pathlib.Path | None = None,
               missing: int = 0):
    super().__init__("rows", records, hasher)
    self.folder, self.missing = None if missing else folder, missing

  @classmethod
  def of(cls, rows, folder: pathlib.Path | None = None) -> RowLog:
    """The log of ``rows`` done before (an older checkpoint's, held in its
    JSON): the next save writes them into ``folder``."""
    log = cls(folder=folder)
    log.add_rows(rows)
    return log

  def add_rows(self, rows) -> None:
    """Appends epoch rows, in order."""
    self.add([row_line(row) for row in rows])

  def position(self, position, best_step: int | None) -> dict:
    """``position`` as a checkpoint records it: instead of its rows, their
    :func:`reference` (the rows not yet in segments written first) and the
    best epoch's step."""
    ref = self.save(self.folder, lambda done: iter(()))  # folder set from the start
    return {**dataclasses.asdict(dataclasses.replace(position, rows=[])),
            "rows": {**ref, "best_step": best_step}}


def read_rows(folder: pathlib.Path, ref: dict) -> tuple[list[dict], Any] | None:
  """The epoch rows a checkpoint's :func:`reference` counts, read back from the
  segments in ``folder``, and their SHA-256; None when they do not read back."""
  found = read_back(folder, "rows", ref)
  if found is None:
    return None
  hasher, texts = found
  return [json.loads(line) for text in texts() for line in text.splitlines()], hasher
