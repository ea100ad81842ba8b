"""Damage that cannot pass silently: a lost or damaged config.json next to intact
checkpoints, paths in config.json that mean one folder from any directory, and a
checkpoint's arrays copied in from another step or run."""

import hashlib
import json
import os

import numpy as np
import pytest

import jaxtrain
from experiments import mnist_pigeon, two_moons
from jaxtrain.rundir.checkpoint import CheckpointError
from jaxtrain.rundir.run import RunDirError, check_workdir
from tests.helpers import tree_equal
from tests.test_checkpoint import assert_same_files
from tests.test_cli import _idx_bytes, cli, snapshot

TINY = ["--epochs", "2", "--samples", "200"]
BUILD = "experiments.two_moons:state_from_record"
DAMAGE = {
    "garbage": lambda path: path.write_bytes(b"\xff\xfe\x00garbage\x9c"),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:40]),
    "deleted": lambda path: path.unlink(),
}
PROBLEM = {"garbage": "not valid JSON", "truncated": "not valid JSON", "deleted": "missing"}


def hashes(directory):
  return {name: hashlib.sha256(data).hexdigest() for name, data in snapshot(directory).items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished two-epoch two_moons run (shared; tests copy it)."""
  workdir = tmp_path_factory.mktemp("damage") / "run"
  code, _, err = cli(*TINY, "--workdir", workdir)
  assert code == 0, err
  return workdir


@pytest.fixture
def damaged(finished, tmp_path, request):
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  DAMAGE[request.param](workdir / "config.json")
  return workdir, request.param


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_load_names_the_damaged_config_and_loads_with_like_or_build(damaged):
  workdir, how = damaged
  with pytest.raises(CheckpointError) as error:
    jaxtrain.checkpoint.load(workdir)
  message = str(error.value)
  assert "\n" not in message and str(workdir / "config.json") in message, message
  assert PROBLEM[how] in message and "like=" in message and "build=" in message, message
  like = two_moons.create_state(two_moons.Config(samples=200))
  by_like = jaxtrain.checkpoint.load(workdir, like=like)
  by_build = jaxtrain.checkpoint.load(workdir, build=BUILD)  # the record its checkpoints hold
  assert int(by_like.step) == int(by_build.step) > 0
  assert np.array_equal(by_like.params["Dense_0"]["kernel"], by_build.params["Dense_0"]["kernel"])


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_a_rerun_of_the_same_run_rebuilds_config_json_and_continues(damaged, finished):
  workdir, _ = damaged
  with pytest.warns(UserWarning, match="records the same run"):
    code, _, err = cli("--epochs", "3", "--samples", "200", "--workdir", workdir)
  assert code == 0, err
  record = json.loads((workdir / "config.json").read_text())
  assert record["config"]["epochs"] == 3 and record["build"] == BUILD
  rows = (workdir / "metrics.csv").read_text().splitlines()
  assert len(rows) == 1 + 3  # the two epochs trained before, then the third
  assert rows[:3] == (finished / "metrics.csv").read_text().splitlines()


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_a_rerun_of_another_run_is_refused_in_one_line_changing_nothing(damaged):
  workdir, how = damaged
  before = hashes(workdir)
  code, out, err = cli(*TINY, "--seed", "1", "--workdir", workdir)
  assert code == 2, out + err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and str(workdir / "config.json") in lines[0], err
  assert PROBLEM[how] in lines[0] and "different run" in lines[0], err
  assert "--overwrite" not in lines[0] and "move the run directory aside" in lines[0], err
  assert hashes(workdir) == before


def test_checkpoints_without_a_record_are_refused_without_suggesting_overwrite(tmp_path):
  state = two_moons.create_state(two_moons.Config())
  jaxtrain.checkpoint.save(tmp_path, state)  # records no run
  before = hashes(tmp_path)
  with pytest.raises(RunDirError) as error:
    check_workdir(tmp_path, {"experiment": "two_moons", "config": {"seed": 0}})
  message = str(error.value)
  assert str(tmp_path / "config.json") in message and "missing" in message, message
  assert "--overwrite" not in message and "do not record" in message, message
  assert hashes(tmp_path) == before


# -- paths: one folder from any working directory ------------------------------------


def _mnist(directory, seed):
  directory.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for prefix in ("train", "t10k"):
    (directory / f"{prefix}-images-idx3-ubyte").write_bytes(
        _idx_bytes(rng.integers(0, 256, (64, 28, 28))))
    (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(rng.integers(0, 10, 64)))


def _pigeon(*args):
  import contextlib

  from experiments import _cli
  from tests.test_cli import _Stream

  out, err = _Stream("utf-8"), _Stream("utf-8")
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      _cli.main(mnist_pigeon.Config, mnist_pigeon.main,
                args=["--train-size", "32", "--val-size", "32", "--batch-size", "16",
                      *map(str, args)])
    except SystemExit as exit_:
      return exit_.code or 0, err.getvalue()
  return 0, err.getvalue()


def test_relative_paths_continue_from_another_directory_and_other_data_is_refused(
    tmp_path, monkeypatch):
  first, second = tmp_path / "first", tmp_path / "second"
  _mnist(first / "mnist", 0)
  _mnist(second / "mnist", 1)  # other data, under the same relative name
  monkeypatch.chdir(first)
  assert _pigeon("--data-dir", "mnist", "--workdir", "run", "--epochs", "1") == (0, "")
  record = json.loads((first / "run" / "config.json").read_text())
  assert record["config"]["data_dir"] == str(first / "mnist")  # absolute

  monkeypatch.chdir(second)
  before = hashes(first / "run")
  code, err = _pigeon("--data-dir", "mnist", "--workdir", "../first/run", "--epochs", "2")
  assert code == 2 and "config.data_dir" in err and str(first / "mnist") in err, err
  assert hashes(first / "run") == before
  code, err = _pigeon("--data-dir", "../first/mnist", "--workdir", "../first/run",
                      "--epochs", "2")
  assert code == 0, err
  assert len((first / "run" / "metrics.csv").read_text().splitlines()) == 1 + 2
  monkeypatch.chdir(tmp_path)
  code, err = _pigeon("--data-dir", first / "mnist", "--workdir", first / "run",
                      "--epochs", "3")
  assert code == 0, err


def test_an_old_relative_path_still_continues_from_its_directory(tmp_path, monkeypatch):
  (tmp_path / "data").mkdir()
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"config": {"data_dir": "data"}}))
  monkeypatch.chdir(tmp_path)
  import pathlib

  assert check_workdir(workdir, {"config": {"data_dir": pathlib.Path("data")}}) is False
  os.rename(tmp_path / "data", tmp_path / "gone")  # as given, also once it is gone
  assert check_workdir(workdir, {"config": {"data_dir": pathlib.Path("data")}}) is False


# -- arrays tied to their step and run ------------------------------------------------

EVERY_EPOCH = ["--samples", "200", "--checkpoint.every-epochs", "1"]


def _moons(workdir, epochs, seed=0):
  code, out, err = cli("--epochs", epochs, "--seed", seed, *EVERY_EPOCH, "--workdir", workdir)
  assert code == 0, err
  return out


@pytest.fixture(scope="module")
def moons_runs(tmp_path_factory):
  """``(epochs, seed) ->`` a finished run, made on first use (shared; tests copy
  them). Three epochs keep the checkpoints of steps 10 and 15."""
  root = tmp_path_factory.mktemp("digest")

  def finished(epochs, seed=0):
    workdir = root / f"{epochs}-{seed}"
    if not workdir.exists():
      _moons(workdir, epochs, seed)
    return workdir

  return finished


@pytest.fixture
def epochs3(moons_runs, tmp_path):
  """A copy of three epochs of seed 0."""
  import shutil

  shutil.copytree(moons_runs(3), tmp_path / "run")
  steps = (p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert sorted(steps) == ["10", "15"]
  return tmp_path / "run"


def _swap(source, target):
  """Puts ``source``'s files of the part (arrays, or the whole checkpoint) in ``target``."""
  import shutil

  shutil.rmtree(target)
  shutil.copytree(source, target)


def test_arrays_of_another_step_fall_back_to_the_previous_and_resume_exactly(
    moons_runs, epochs3):
  workdir = epochs3
  _swap(workdir / "checkpoints" / "10" / "arrays", workdir / "checkpoints" / "15" / "arrays")
  with pytest.warns(UserWarning, match="damaged") as caught:
    out = _moons(workdir, 4)
  damaged = [str(w.message) for w in caught if "damaged" in str(w.message)]
  assert len(damaged) == 1 and "\n" not in damaged[0], damaged
  assert f"checkpoint 15 in {workdir / 'checkpoints'} " in damaged[0], damaged
  assert "arrays do not match" in damaged[0] and "falling back" in damaged[0], damaged
  assert "resuming from the checkpoint at step 10 " in out, out
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == ["15"]
  reference = moons_runs(4)  # uninterrupted
  assert_same_files(workdir, reference)  # metrics.csv (but its seconds), steps.jsonl
  got = jaxtrain.checkpoint.load(workdir, build=BUILD)
  want = jaxtrain.checkpoint.load(reference, build=BUILD)
  assert int(got.step) == int(want.step) == 20
  assert tree_equal(jaxtrain.state.state_arrays(got), jaxtrain.state.state_arrays(want))


def test_arrays_of_another_run_at_the_same_step_are_detected(moons_runs, epochs3):
  workdir = epochs3
  _swap(moons_runs(3, seed=1) / "checkpoints" / "15" / "arrays",
        workdir / "checkpoints" / "15" / "arrays")
  with pytest.warns(UserWarning, match="checkpoint 15 .* arrays do not match"):
    state = jaxtrain.checkpoint.load(workdir, build=BUILD)
  assert int(state.step) == 10


@pytest.mark.parametrize("part", ["arrays", "whole checkpoint"])
def test_loading_the_swapped_step_is_refused_in_one_line(epochs3, part):
  workdir = epochs3
  checkpoints = workdir / "checkpoints"
  if part == "arrays":
    _swap(checkpoints / "10" / "arrays", checkpoints / "15" / "arrays")
  else:  # its meta too: the digest names step 10
    _swap(checkpoints / "10", checkpoints / "15")
  with pytest.raises(CheckpointError) as error:
    jaxtrain.checkpoint.load(workdir, step=15, build=BUILD)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"checkpoint 15 in {checkpoints} "), message
  assert "arrays do not match" in message and "step 15" in message, message


def test_a_checkpoint_without_an_arrays_digest_still_loads(moons_runs, epochs3):
  from jaxtrain.rundir import digest, integrity

  workdir = epochs3
  path = workdir / "checkpoints" / "15" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  assert digest.KEY in meta
  old = {k: v for k, v in meta.items() if k not in (digest.KEY, integrity.DIGEST)}
  path.write_text(json.dumps(integrity.with_digest(old)))  # as written before the digest
  want = jaxtrain.checkpoint.load(moons_runs(3), build=BUILD)
  got = jaxtrain.checkpoint.load(workdir, step=15, build=BUILD)
  assert tree_equal(jaxtrain.state.state_arrays(got), jaxtrain.state.state_arrays(want))
  # Not verified: the arrays of another step load as they are (as before the digest).
  _swap(workdir / "checkpoints" / "10" / "arrays", workdir / "checkpoints" / "15" / "arrays")
  assert int(jaxtrain.checkpoint.load(workdir, step=15, build=BUILD).step) == 10
