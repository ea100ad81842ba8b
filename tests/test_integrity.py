"""A damaged run directory costs one warning line, never the run: damaged
Orbax side files, an edited checkpoint position, a cut or deleted steps.jsonl
and a half-done deletion all resume to the uninterrupted run's files."""

import json
import pathlib
import re
import shutil
import tempfile
import warnings

import jax
import numpy as np
import pytest

from experiments import _cli, two_moons
from tests.helpers import untimed_rows

RUN = ["--samples", "200", "--batch-size", "40", "--checkpoint.every-epochs", "1"]
EPOCHS, SPE = 6, 4  # 160 training points in batches of 40


def moons(workdir, epochs):
  _cli.main(two_moons.Config, two_moons.main,
            [*RUN, "--epochs", str(epochs), "--workdir", str(workdir)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The uninterrupted run, and the same run stopped after EPOCHS - 1 epochs."""
  root = tmp_path_factory.mktemp("integrity")
  moons(root / "whole", EPOCHS)
  moons(root / "part", EPOCHS - 1)
  return root / "whole", root / "part"


def flip(path):
  data = path.read_bytes()
  path.write_bytes(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])


def cut(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_a_value(path):
  text = path.read_text()
  match = re.search(r'"value": 0\.(\d)', text)  # the best epoch's val_loss
  digit = match.end() - 1
  path.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])


LAST, FIRST = EPOCHS - 1, EPOCHS - 2  # the two kept checkpoints, in epochs
CASES = {  # name: (file under checkpoints/<step>, damage, checkpoint it resumes from, warning)
    "latest metrics flipped": ("metrics/metrics", LAST, flip, LAST, r"metrics/metrics is damaged"),
    "oldest metrics cut": ("metrics/metrics", FIRST, cut, LAST, r"metrics/metrics is damaged"),
    "latest checkpoint metadata cut": ("_CHECKPOINT_METADATA", LAST, cut, LAST,
                                       r"_CHECKPOINT_METADATA is damaged"),
    "latest position edited": ("meta/metadata", LAST, edit_a_value, FIRST,
                               r"do not match their SHA-256"),
    "latest step log edited": ("meta/metadata", LAST, lambda p: p.write_text(
        p.read_text().replace('"step_log": {"records": ', '"step_log": {"records": 1', 1)),
                               FIRST, r"do not match their SHA-256"),
    "latest array metadata cut": ("arrays/array_metadatas/process_0", LAST, cut, FIRST,
                                  r"checkpoint \d+ in .* is damaged"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_file_costs_one_warning_naming_it(runs, tmp_path, capsys, case):
  whole, part = runs
  name, epoch, how, resumed, warning = CASES[case]
  workdir = tmp_path / "run"
  shutil.copytree(part, workdir)
  how(workdir / "checkpoints" / str(epoch * SPE) / name)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    moons(workdir, EPOCHS)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1 and re.search(warning, messages[0]), messages
  assert f"resuming from the checkpoint at step {resumed * SPE} " in capsys.readouterr().out
  assert untimed_rows(workdir) == untimed_rows(whole)
  assert (workdir / "steps.jsonl").read_bytes() == (whole / "steps.jsonl").read_bytes()


@pytest.mark.parametrize("how", ["cut mid-line", "deleted", "a value edited", "emptied"])
def test_steps_jsonl_is_rewritten_from_the_checkpoint(runs, tmp_path, how):
  whole, part = runs
  workdir = tmp_path / "run"
  shutil.copytree(part, workdir)
  log = workdir / "steps.jsonl"
  if how == "cut mid-line":
    log.write_bytes(log.read_bytes()[:333])
  elif how == "deleted":
    log.unlink()
  elif how == "a value edited":
    log.write_text(log.read_text().replace('"step": 3,', '"step": 4,'))
  else:
    log.write_text("")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing to warn about: the checkpoint has the lines
    moons(workdir, EPOCHS)
  assert log.read_bytes() == (whole / "steps.jsonl").read_bytes()
  assert len(log.read_text().splitlines()) == EPOCHS * SPE


def test_the_checkpoint_counts_its_logs_whose_lines_are_stored_once(runs):
  _, part = runs
  meta = json.loads((part / "checkpoints" / str(LAST * SPE) / "meta" / "metadata").read_text())
  import hashlib

  from jaxtrain.rundir.integrity import digest
  from jaxtrain.train import logstore

  assert meta["sha256"] == digest({k: v for k, v in meta.items() if k != "sha256"})
  steps = (part / "steps.jsonl").read_bytes()
  assert meta["step_log"] == {"records": LAST * SPE,
                              "sha256": hashlib.sha256(steps).hexdigest()}
  rows = meta["position"]["rows"]
  assert rows["records"] == LAST and rows["best_step"] % SPE == 0
  folder = part / "checkpoints" / logstore.FOLDER
  hasher, texts = logstore.read_back(folder, "steps", meta["step_log"])
  assert "".join(texts()).encode() == steps
  # One segment per save and log, each with only the lines since the previous save.
  assert sorted(p.name for p in folder.iterdir()) == sorted(
      [f"rows.{e:012d}-{e:012d}.z" for e in range(1, LAST + 1)]
      + [f"steps.{e * SPE - SPE + 1:012d}-{e * SPE:012d}.z" for e in range(1, LAST + 1)])


@pytest.mark.parametrize("damage", ["rows segment", "steps segment", "both logs"])
def test_damaged_log_segments_cost_at_most_one_warning(runs, tmp_path, damage):
  """Segments are read only when a file is damaged: a damaged steps segment
  under an intact steps.jsonl is never read; damaged rows cost one warning,
  metrics.csv keeping its rows."""
  whole, part = runs
  workdir = tmp_path / "run"
  shutil.copytree(part, workdir)
  logs = workdir / "checkpoints" / "logs"
  if damage != "steps segment":
    flip(logs / f"rows.{2:012d}-{2:012d}.z")
  if damage != "rows segment":
    cut(logs / f"steps.{SPE + 1:012d}-{2 * SPE:012d}.z")
  if damage == "both logs":
    (workdir / "steps.jsonl").unlink()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    moons(workdir, EPOCHS)
  messages = [str(w.message) for w in caught]
  if damage == "steps segment":
    assert messages == []
  elif damage == "rows segment":
    assert len(messages) == 1 and "epoch rows" in messages[0], messages
  else:
    assert len(messages) == 2 and "epoch rows" in messages[0], messages
    assert "steps.jsonl has 0 step records" in messages[1], messages
    return
  assert untimed_rows(workdir) == untimed_rows(whole)
  assert (workdir / "steps.jsonl").read_bytes() == (whole / "steps.jsonl").read_bytes()


def test_an_older_checkpoint_holding_its_logs_resumes(runs, tmp_path):
  """Checkpoints written before the log segments held the epoch rows and the
  step log (zlib chunks) in their JSON."""
  import hashlib

  from jaxtrain.rundir.integrity import with_digest
  from jaxtrain.train import logstore
  from jaxtrain.train.ledger import StepLog

  whole, part = runs
  workdir = tmp_path / "run"
  shutil.copytree(part, workdir)
  lines = (workdir / "steps.jsonl").read_text().splitlines(keepends=True)
  last = json.loads((workdir / "checkpoints" / str(LAST * SPE) / "meta" / "metadata").read_text())
  _, texts = logstore.read_back(workdir / "checkpoints" / logstore.FOLDER, "rows",
                                last["position"]["rows"])
  rows = [json.loads(line) for text in texts() for line in text.splitlines()]
  for epoch in (FIRST, LAST):
    path = workdir / "checkpoints" / str(epoch * SPE) / "meta" / "metadata"
    meta = {k: v for k, v in json.loads(path.read_text()).items() if k != "sha256"}
    meta["position"]["rows"] = rows[:epoch]
    meta["step_log"] = [StepLog.chunk(lines[: epoch * SPE])]
    path.write_text(json.dumps(with_digest(meta)))
  shutil.rmtree(workdir / "checkpoints" / "logs")
  (workdir / "steps.jsonl").write_text("damaged\n")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    moons(workdir, EPOCHS)
  assert untimed_rows(workdir) == untimed_rows(whole)
  assert (workdir / "steps.jsonl").read_bytes() == (whole / "steps.jsonl").read_bytes()
  meta = json.loads((workdir / "checkpoints" / str(EPOCHS * SPE) / "meta" / "metadata")
                    .read_text())  # the new checkpoint counts them, the segments hold them
  assert meta["step_log"]["sha256"] == hashlib.sha256(
      (whole / "steps.jsonl").read_bytes()).hexdigest()


def test_a_half_done_deletion_is_finished_and_leaves_no_step_folder(runs, tmp_path):
  whole, part = runs
  workdir = tmp_path / "run"
  shutil.copytree(part, workdir)
  # Orbax renames a checkpoint it deletes into checkpoints/deleting/ (atomic);
  # a kill before the folder was removed leaves it there.
  orphan = workdir / "checkpoints" / "deleting" / str(2 * SPE)
  shutil.copytree(workdir / "checkpoints" / str(LAST * SPE), orphan)
  moons(workdir, EPOCHS)
  listing = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert listing == sorted(p.name for p in (whole / "checkpoints").iterdir())
  assert "deleting" not in listing and str(EPOCHS * SPE) in listing
  assert untimed_rows(workdir) == untimed_rows(whole)


@pytest.mark.parametrize("name", ["metrics/metrics", "_CHECKPOINT_METADATA"])
@pytest.mark.parametrize("epoch", [LAST, FIRST])
def test_load_reads_past_a_damaged_side_file_and_changes_nothing(runs, tmp_path, name, epoch,
                                                                 monkeypatch):
  import jaxtrain

  views = tmp_path / "tmp"  # where a reader's temporary views go
  views.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(views))
  made = []
  mkdtemp = tempfile.mkdtemp
  monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
  whole, part = runs
  workdir = tmp_path / "run"
  shutil.copytree(part, workdir)
  expected = jaxtrain.checkpoint.load(part), jaxtrain.checkpoint.load(part, "best")
  assert not made  # nothing damaged: no view
  flip(workdir / "checkpoints" / str(epoch * SPE) / name)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    states = jaxtrain.checkpoint.load(workdir), jaxtrain.checkpoint.load(workdir, "best")
    best = jaxtrain.checkpoint.best_epoch(workdir)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 3 and all(
      m.startswith(f"{workdir / 'checkpoints' / str(epoch * SPE) / name} is damaged")
      for m in messages), messages
  assert len(made) == 3  # each reader read through a view of its own...
  assert not list(views.iterdir())  # ...and removed it
  for state, want in zip(states, expected):
    assert int(state.step) == int(want.step)
    assert jax.tree.all(jax.tree.map(np.array_equal, state.params, want.params))
  assert best == jaxtrain.checkpoint.best_epoch(part)
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_a_reader_that_fails_to_open_removes_its_view(runs, tmp_path, monkeypatch):
  from jaxtrain.rundir.checkpointer import Checkpointer

  views = tmp_path / "tmp"
  views.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(views))
  workdir = tmp_path / "run"
  shutil.copytree(runs[1], workdir)
  flip(workdir / "checkpoints" / str(LAST * SPE) / "metrics/metrics")

  def fails(self):
    assert list(views.iterdir())  # the view exists while the manager opens
    raise OSError("cannot open")

  monkeypatch.setattr(Checkpointer, "_open_manager", fails)
  with pytest.warns(UserWarning, match="is damaged"), pytest.raises(OSError, match="cannot open"):
    Checkpointer(workdir, read_only=True)
  assert not list(views.iterdir())


# -- full and read-only disks -----------------------------------------------------

def test_a_failed_save_raises_one_line_naming_the_intact_checkpoints(tmp_path, monkeypatch):
  import errno
  import os

  import numpy as np

  from jaxtrain.rundir.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointSaveError,
  )

  checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
  arrays = {"state": {"w": np.arange(4.0)}}
  checkpointer.save(10, arrays, {"position": {"epoch": 1}})
  checkpointer.wait()

  # tensorstore words a full disk in a ValueError, Python's own writes in an OSError.
  for error in (ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": No space left '
                           'on device'), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):

    def full(*args, error=error, **kwargs):
      raise error

    monkeypatch.setattr(checkpointer.manager, "save", full)
    with pytest.raises(CheckpointSaveError) as failed:
      checkpointer.save(20, arrays, {"position": {"epoch": 2}})
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"saving a checkpoint in {tmp_path / 'checkpoints'} failed "
                              "(no space left on the device); the checkpoints before it are "
                              "intact (steps 10)"), message
    monkeypatch.undo()
  step, restored, meta = checkpointer.restore({"state": {"w": np.zeros(4)}})
  assert step == 10 and meta["position"] == {"epoch": 1}
  checkpointer.close()


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MiB tmpfs (needs mount rights: root, or CAP_SYS_ADMIN)."""
  import subprocess

  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()[:80]})")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_exits_4_in_one_line_and_the_rerun_is_the_same_run(small_disk, tmp_path):
  import os
  import subprocess
  import sys

  REPO = pathlib.Path(__file__).resolve().parents[1]

  def command(workdir):
    return [sys.executable, "-m", "experiments.two_moons", *RUN, "--epochs", "30",
            "--workdir", str(workdir)]

  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=env, check=True,
                 capture_output=True)
  filler = small_disk / "filler"
  filler.write_bytes(bytes(1900 * 1024))  # a few checkpoints' room, not 30
  workdir = small_disk / "run"
  done = subprocess.run(command(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)  # never hangs
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert done.returncode == 4, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 2, done.stderr
  # Which write meets the full disk first (a checkpoint, or a log) depends on timing.
  assert re.match(r"error: saving a checkpoint in .* failed \(no space left on the device\); "
                  r"the checkpoints before it are intact \(steps \d+|error: writing the run "
                  r"failed \(\[Errno 28\] No space left on device\)", errors[0]), errors
  filler.unlink()
  done = subprocess.run(command(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert untimed_rows(workdir) == untimed_rows(tmp_path / "whole")
  assert (workdir / "steps.jsonl").read_bytes() == (tmp_path / "whole" / "steps.jsonl").read_bytes()
  # Read-only: refused before anything changes, in one line.
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  done = subprocess.run([*command(workdir)[:-4], "--epochs", "40", "--workdir", str(workdir)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and done.stderr.strip().splitlines() == [
      f"error: workdir {str(workdir)!r} cannot be written (Read-only file system); "
      "nothing was changed"], done.stderr
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_an_unwritable_run_directory_exits_2_and_a_failed_write_exits_4(tmp_path, capsys,
                                                                        monkeypatch):
  """Without mount rights: the OS errors a read-only disk and a full one raise."""
  import errno
  import pathlib as pathlib_

  from jaxtrain.rundir.checkpoint import Checkpointer

  real_mkdir = pathlib_.Path.mkdir

  def read_only(self, *args, **kwargs):
    if self.name == "ro":
      raise OSError(errno.EROFS, "Read-only file system", str(self))
    return real_mkdir(self, *args, **kwargs)

  monkeypatch.setattr(pathlib_.Path, "mkdir", read_only)
  with pytest.raises(SystemExit) as exit_:
    moons(tmp_path / "ro", 2)
  assert exit_.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: workdir {str(tmp_path / 'ro')!r} cannot be written (Read-only file system); "
      "nothing was changed"]
  assert not (tmp_path / "ro").exists()
  monkeypatch.undo()

  def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  moons(tmp_path / "run", 2)  # a first checkpoint at the end
  monkeypatch.setattr(Checkpointer, "save", full)
  with pytest.raises(SystemExit) as exit_:
    moons(tmp_path / "run", 4)
  assert exit_.value.code == 4
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: writing the run failed ([Errno 28] No space left on device); its "
                 "checkpoints so far are intact: fix the disk and run the same command to "
                 "resume"], err
  monkeypatch.undo()
  moons(tmp_path / "run", 4)  # resumes from the intact checkpoint
