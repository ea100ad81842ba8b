"""Keeping a checkpoint directory readable and its damage quiet.

What :class:`jaxtrain.checkpoint.Checkpointer` does around Orbax so that a
damaged or half-deleted directory costs one warning line, never the run:

- Side files Orbax reads for every checkpoint when it opens the directory (a
  step's ``metrics/metrics``, ``_CHECKPOINT_METADATA``) are checked first; a
  damaged one is moved to ``checkpoints_damaged/`` with a warning naming it (the
  checkpoint itself stays: only its rank for "best" or its timestamp is lost).
- Old checkpoints are deleted by renaming them into ``checkpoints/deleting/``
  (atomic) and removing that folder's contents afterwards, so a kill during a
  deletion leaves no half-deleted step that looks like a checkpoint.
- Each checkpoint's JSON (epoch rows, step log, position, seed) carries a
  SHA-256 of itself; an edited or damaged one reads as a damaged checkpoint.
  It also records the SHA-256 of the checkpoint's arrays, step and run
  (:mod:`jaxtrain.rundir.digest`): arrays copied in from another step or run
  read as a damaged checkpoint too.
- Orbax's routine absl records, and the tracebacks a failed read leaves behind
  ("Event loop is closed" from tensorstore callbacks, abandoned read
  coroutines), are dropped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import warnings
from typing import Any

DELETING = "deleting"  # the subfolder Orbax renames deleted checkpoints into
# Orbax warnings that say what was asked for: a save without a metric
# (mid-epoch saves carry none on purpose: only epoch ends are ranked for
# "best"), a reader's read-only manager (load() reads, never writes), and the
# side files check_side_files has already reported and moved aside.
_EXPECTED_WARNINGS = ("tracked_metric", "read_only=True", "Given directory is read only",
                      "Metadata file does not exist", "could not be restored. Please provide")
# Orbax ERROR records that precede an exception jaxtrain reports in one line (a
# failed save, a damaged side file already reported); other ERROR records pass.
_REPORTED_ERRORS = ("raised an exception", "Failed to run", "Save Finalize thread",
                    "Failed to read Metadata file", "Failed to json parse Metadata")


class QuietOrbax(logging.Filter):
  """Drops Orbax's routine records from the absl logger: its INFO lines (every
  save logs several), the warnings for what jaxtrain asks on purpose, and the
  ERROR records (with tracebacks, several per failed save) of failures that
  reach jaxtrain as an exception it reports in one line (``JAXTRAIN_DEBUG=1``
  shows them). Other ERROR records, and other libraries', pass unchanged."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    message = record.getMessage()
    if record.levelno >= logging.ERROR:
      return bool(os.environ.get("JAXTRAIN_DEBUG")) or not any(
          reported in message for reported in _REPORTED_ERRORS)
    return not any(expected in message for expected in _EXPECTED_WARNINGS)


def _failed_read_noise(unraisable) -> bool:
  """Whether an unraisable exception is the echo of a failed Orbax read (which
  the fallback's warning has reported): a tensorstore callback on the closed
  event loop, or an abandoned Orbax read coroutine's error."""
  error, where = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(where, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def import_orbax():
  """Orbax, imported on first use (about 1.3 s: ``import jaxtrain`` stays
  light), with its routine logging and closed-loop noise silenced."""
  import orbax.checkpoint as ocp

  absl = logging.getLogger("absl")
  if not any(isinstance(f, QuietOrbax) for f in absl.filters):
    absl.addFilter(QuietOrbax())
  previous = sys.unraisablehook
  if not getattr(previous, "drops_failed_read_noise", False):
    # After a failed read, tensorstore completes its futures on the event
    # loop Orbax already closed, and Orbax's abandoned read coroutines are
    # collected with their errors: Python prints each as a traceback.
    def hook(unraisable):
      if not _failed_read_noise(unraisable):
        previous(unraisable)

    hook.drops_failed_read_noise = True
    sys.unraisablehook = hook
    # The same abandoned read, when collected before it started.
    warnings.filterwarnings("ignore", r"coroutine '_read_array_index_and_device_put' was "
                            "never awaited", RuntimeWarning)
  return ocp


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full or failing disk); the ones
  saved before it are intact."""


# How tensorstore and Orbax word a failed write (they raise ValueError, RuntimeError).
_WRITE_FAILURES = ("RESOURCE_EXHAUSTED", "No space left", "PERMISSION_DENIED", "DATA_LOSS",
                   "Read-only file system", "Disk quota")


def is_write_failure(error: BaseException) -> bool:
  """Whether a save's error is the disk's (reported as CheckpointSaveError),
  not a bug in what was saved (raised as it is)."""
  if isinstance(error, OSError):
    return True
  text = str(error)
  return any(marker in text for marker in _WRITE_FAILURES)


def save_failed(directory: pathlib.Path, error: BaseException) -> CheckpointSaveError:
  """The one-line error for a failed save, naming what is left on disk."""
  text = str(error)
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    reason = "no space left on the device"  # the same words whichever layer failed
  elif isinstance(error, OSError) and error.strerror:
    reason = error.strerror
  elif "RESOURCE_EXHAUSTED" in text or "No space left" in text:
    reason = "no space left on the device"
  else:
    reason = f"{type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"
  try:
    kept = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  except OSError:
    kept = []
  left = (f"the checkpoints before it are intact (steps {', '.join(map(str, kept))})"
          if kept else "no earlier checkpoint exists")
  return CheckpointSaveError(f"saving a checkpoint in {directory} failed ({reason}); {left}; "
                             "fix the disk and run the same command to resume")


def _readable_json(path: pathlib.Path) -> str | None:
  """Why ``path`` (if it exists) is not a JSON object, or None."""
  try:
    value = json.loads(path.read_bytes().decode("utf-8"))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as error:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
  return None if isinstance(value, dict) else f"not a JSON object: {str(value)[:40]!r}"


def check_side_files(directory: pathlib.Path, *, read_only: bool) -> pathlib.Path | None:
  """Reports and moves aside damaged side files before Orbax reads them.

  A reader (``read_only``) changes nothing: it gets a temporary view of the
  checkpoints (symbolic links) without the damaged files, returned for Orbax
  to read instead (the caller removes it); None when nothing is damaged.
  """
  if not directory.is_dir():
    return None
  damaged: dict[pathlib.Path, list[str]] = {}
  for step in sorted((p for p in directory.iterdir() if p.name.isdigit()),
                     key=lambda p: int(p.name)):
    for name in ("metrics/metrics", "_CHECKPOINT_METADATA"):
      path = step / name
      why = _readable_json(path)
      if why is None:
        continue
      if read_only:
        warnings.warn(f"{path} is damaged ({why}); read without it", stacklevel=3)
        damaged.setdefault(step, []).append(name)
        continue
      aside = directory.parent / f"{directory.name}_damaged"
      aside.mkdir(exist_ok=True)
      target = aside / f"{step.name}-{name.replace('/', '-')}-{time.time_ns()}"
      path.rename(target)
      effect = ("is no longer ranked for the best checkpoint" if name.startswith("metrics")
                else "keeps its arrays")
      warnings.warn(f"{path} is damaged ({why}); moved to {target}: checkpoint "
                    f"{step.name} {effect}", stacklevel=3)
  return _view_without(directory, damaged) if damaged else None


def _view_without(directory: pathlib.Path, damaged: dict[pathlib.Path, list[str]]
                  ) -> pathlib.Path:
  """A temporary directory linking to everything in ``directory`` but the
  ``damaged`` side files (by step folder)."""
  import tempfile

  view = pathlib.Path(tempfile.mkdtemp(prefix="jaxtrain-checkpoints-"))
  try:
    for entry in directory.iterdir():
      if entry not in damaged:
        (view / entry.name).symlink_to(entry)
        continue
      (view / entry.name).mkdir()
      for part in sorted(entry.rglob("*")):  # parents before their contents
        target = view / entry.name / part.relative_to(entry)
        if part.is_dir():
          target.mkdir()
        elif part.relative_to(entry).as_posix() not in damaged[entry]:
          target.symlink_to(part)
  except BaseException:
    shutil.rmtree(view, ignore_errors=True)
    raise
  return view


def purge_deleted(directory: pathlib.Path, *, closing: bool = False) -> None:
  """Removes the checkpoints Orbax has renamed into ``deleting/`` (and the
  folder itself once the manager is ``closing``)."""
  for path in (directory / DELETING).glob("*"):
    shutil.rmtree(path, ignore_errors=True)
  if closing:
    try:
      (directory / DELETING).rmdir()
    except OSError:  # absent, or not empty
      pass


def digest(position: Any) -> str:
  """The SHA-256 of a JSON value (keys sorted)."""
  text = json.dumps(position, sort_keys=True, allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


DIGEST = "sha256"  # the key of a checkpoint meta's digest of everything else in it


def with_digest(meta: dict) -> dict:
  """``meta`` with the digest of its contents (position, step log, seed...),
  as a checkpoint saves it."""
  return {**meta, DIGEST: digest(meta)}


def check_digest(meta: dict) -> None:
  """Raises ValueError when a checkpoint's meta does not match its digest, or
  its step log does not decode (checkpoints written before the digest pass)."""
  wanted = meta.get(DIGEST)
  if wanted is not None and digest({k: v for k, v in meta.items() if k != DIGEST}) != wanted:
    raise ValueError("its epoch rows, step log or position do not match their SHA-256 "
                     "(edited or damaged meta/metadata)")
  if isinstance(meta.get("step_log"), list):  # an older checkpoint's lines
    from jaxtrain.train.ledger import StepLog

    try:
      StepLog(0, tuple(meta["step_log"])).text()
    except Exception as error:  # noqa: BLE001 - zlib, base64, unicode: all damage
      raise ValueError(f"its step log does not decode ({type(error).__name__})") from None
