"""Values no flag means are refused in one line naming the flag, before
anything is written; values that mean the same run are the same run."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

import jaxtrain
from experiments import _cli, mnist_cnn, two_moons
from jaxtrain import models
from jaxtrain.engine.distributed import DistributedConfig
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.rundir.run import check_workdir
from jaxtrain.train.config import validate

TINY = ["--samples", "200", "--epochs", "2", "--batch-size", "40"]


@pytest.mark.parametrize("args, message", [
    (["--seed", "1180591620717411303424"], r"--seed must be in 0\.\.4294967295 .* got 1180591620717411303424"),
    (["--seed", "-1"], r"--seed must be in 0\.\.4294967295 .* got -1"),
    (["--seed", "4294967296"], r"got 4294967296"),
    (["--epochs", "99999999999999999999"], r"--epochs 99999999999999999999 is out of range"),
    (["--learning-rate", "nan"], r"--learning-rate must be a number, got nan"),
    (["--hidden", "16", "nan"], None),  # not a float at all: tyro's own line
    (["--workdir", ""], r"--workdir needs a value, got an empty string"),
    (["--workdir="], r"--workdir needs a value, got an empty string"),
    (["--checkpoint.every-seconds", "nan"], r"every_seconds must be >= 0, got nan"),
    (["--distributed.heartbeat-seconds", "0"],
     r"--distributed\.heartbeat-seconds must be a whole number of seconds >= 1, got 0"),
    (["--distributed.heartbeat-seconds", "-5"], r"--distributed\.heartbeat-seconds .* got -5"),
    (["--distributed.heartbeat-seconds", "nan"], r"--distributed\.heartbeat-seconds.*'nan'"),
    # Refused as given, not later for a process id it leaves no room for.
    (["--distributed.num-processes", "0"], r"--distributed\.num-processes must be >= 1, got 0"),
    (["--distributed.num-processes", "-2", "--distributed.process-id", "0",
      "--distributed.coordinator", "localhost:1"],
     r"--distributed\.num-processes must be >= 1, got -2"),
])
def test_a_value_no_flag_means_exits_2_naming_it(capsys, args, message):
  with pytest.raises(SystemExit) as exit_:
    _cli.parse(two_moons.Config, args)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert message is None or re.search(message, err[0]), err[0]


def test_the_largest_seed_is_accepted_and_seeds_may_not_pass_it():
  config = _cli.parse(two_moons.Config, ["--seed", "4294967295"])
  assert config.seed == 2**32 - 1
  with pytest.raises(ValueError, match=r"--seeds 2 from --seed 4294967295 passes the largest"):
    two_moons.train_seeds(_cli.parse(two_moons.Config, ["--seed", "4294967295", "--seeds", "2"]))


def test_a_sweep_member_with_an_aliasing_seed_is_refused():
  with pytest.raises(ValueError, match=r"--seed must be in 0\.\.4294967295"):
    _cli.parse_with_default(two_moons.Config, ["--seed", "4294967296"], two_moons.Config())


@pytest.mark.parametrize("kwargs, message", [
    ({"heartbeat_seconds": float("nan")}, r"heartbeat-seconds must be a whole number .* got nan"),
    ({"heartbeat_seconds": 2.5}, r"got 2\.5"),
    ({"heartbeat_seconds": True}, r"got True"),
    ({"num_processes": 0}, r"--distributed\.num-processes must be >= 1, got 0"),
])
def test_distributed_values_are_checked_when_the_config_is_made(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DistributedConfig(**kwargs)


def test_no_processes_from_the_environment_names_the_variable(monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "0")
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES must be >= 1, got '0'"):
    DistributedConfig().resolved()


# (training rows, batch_size, accumulate_steps, drop_remainder): steps per epoch
@pytest.mark.parametrize("n, batch_size, accumulate, drop, steps_per_epoch", [
    (64, 16, 1, False, 4),
    (100, 16, 2, False, 4),  # 32 rows per update: 3 and a partial one
    (100, 16, 2, True, 3),
])
def test_a_run_of_more_steps_than_the_int32_counter_holds_is_refused(
    n, batch_size, accumulate, drop, steps_per_epoch):
  def config(epochs):
    return jaxtrain.FitConfig(epochs=epochs, batch_size=batch_size,
                              accumulate_steps=accumulate, drop_remainder=drop)

  most = (2**31 - 1) // steps_per_epoch
  validate(config(most), n)  # the last step is 2**31 - 1 at most: it fits
  with pytest.raises(ValueError, match=(
      rf"^--epochs {most + 1} makes {(most + 1) * steps_per_epoch} steps "
      rf"\({steps_per_epoch} per epoch\), more than the int32 step counter holds "
      rf"\(2\*\*31 - 1 = 2147483647\); at most {most} epochs$")):
    validate(config(most + 1), n)


def test_fit_refuses_an_overflowing_step_count_before_it_compiles():
  x = np.zeros((64, 2), np.float32)
  arrays = {"inputs": x, "targets": np.zeros(64, np.int32)}
  state = jaxtrain.create_train_state(
      models.MLP(hidden_sizes=(4,), outputs=2), jaxtrain.make_optimizer("sgd", 0.1),
      jax.random.key(0), x[:1], loss_fn=jaxtrain.losses.cross_entropy)
  with pytest.raises(ValueError, match=r"--epochs 10000000000000 .* 2147483647"):
    jaxtrain.fit(state, arrays, config=jaxtrain.FitConfig(epochs=10**13, batch_size=16,
                                                          progress=False))


def test_mnist_cnn_features_without_a_value_is_refused(tmp_path, capsys):
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_:
    _cli.main(mnist_cnn.Config, mnist_cnn.main, ["--workdir", str(workdir), "--features"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --features needs the channels of at least one conv block "
                 "(e.g. --features 32 64), got none"], err
  assert not workdir.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"features": (0,)}, r"features must be channel counts >= 1, got \(0,\)"),
    ({"features": (8, -3)}, r"got \(8, -3\)"),
    ({"dense": -1}, r"dense must be >= 0 and outputs >= 1, got dense=-1"),
    ({"outputs": 0}, r"outputs=0"),
])
def test_cnn_sizes_are_checked_when_the_model_is_made(kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.CNN(**kwargs)
  models.CNN(features=(), dense=0)  # no conv block, no hidden layer: a linear model


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    (["--warmup-epochs", "inf"], r"--warmup-epochs must be a finite number >= 0, got inf"),
    (["--warmup-epochs", "-1"], r"got -1"),
])
def test_mnist_cnn_schedule_values_are_refused_before_any_division(flags, message):
  with pytest.raises(ValueError, match=message):
    mnist_cnn.make_schedule(_cli.parse(mnist_cnn.Config, flags), 1000)


def refused(capsys, *flags) -> list[str]:
  """two_moons run with ``flags`` (TINY first): exits 2; its stderr lines."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    _cli.main(two_moons.Config, two_moons.main, [*TINY, *flags])
  assert exit_.value.code == 2
  return capsys.readouterr().err.strip().splitlines()


def test_fewer_epochs_than_a_finished_run_is_refused_and_changes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  _cli.main(two_moons.Config, two_moons.main, [*TINY, "--workdir", str(workdir)])
  before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
  err = refused(capsys, "--epochs", "1", "--workdir", str(workdir))
  assert err == [f"error: --epochs 1 is fewer than the 2 epochs the run in {workdir} has "
                 "trained; give --epochs 2 or more to continue it, or another --workdir"]
  assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before
  # The same epochs (a finished run, rerun) is accepted.
  _cli.main(two_moons.Config, two_moons.main, [*TINY, "--workdir", str(workdir)])


def tree_hashes(root):
  """Every file and folder under ``root``: a path's SHA-256 (None: a folder)."""
  import hashlib

  return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(
      p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


@pytest.mark.filterwarnings("error")  # the refusal alone: no warning about the damage
def test_a_refused_rerun_changes_no_file_even_with_damage_and_deletions_pending(tmp_path, capsys):
  """A damaged side file (process 0 moves it aside when the run opens its
  checkpoints) and a half-purged deletion (removed at the next save) stay as
  they were: the refusal is decided before the run directory is opened."""
  workdir = tmp_path / "run"
  _cli.main(two_moons.Config, two_moons.main, [*TINY, "--workdir", str(workdir)])
  checkpoints = workdir / "checkpoints"
  step = min(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  side = checkpoints / str(step) / "_CHECKPOINT_METADATA"
  assert side.is_file()
  side.write_bytes(b"\x00garbled")
  (checkpoints / "deleting" / "3").mkdir(parents=True)
  (checkpoints / "deleting" / "3" / "left").write_text("a deletion a kill interrupted")
  before = tree_hashes(workdir)
  err = refused(capsys, "--epochs", "1", "--workdir", str(workdir))
  assert len(err) == 1 and "--epochs 1 is fewer than the 2 epochs" in err[0], err
  assert tree_hashes(workdir) == before


def test_a_checkpoint_of_another_seeds_run_is_refused_in_one_line(tmp_path, capsys):
  """A whole checkpoint (arrays and meta, consistent with each other) copied in
  from a run of another seed: continuing from it would train seed 1's weights
  with seed 0's keys. Refused, naming it, before anything changes."""
  ours, theirs = tmp_path / "ours", tmp_path / "theirs"
  for workdir, seed in ((ours, "0"), (theirs, "1")):
    _cli.main(two_moons.Config, two_moons.main, [*TINY, "--seed", seed, "--workdir",
                                                 str(workdir)])
  latest = max(int(p.name) for p in (ours / "checkpoints").iterdir() if p.name.isdigit())
  shutil.rmtree(ours / "checkpoints" / str(latest))
  shutil.copytree(theirs / "checkpoints" / str(latest), ours / "checkpoints" / str(latest))
  before = tree_hashes(ours)
  err = refused(capsys, "--epochs", "3", "--workdir", str(ours))
  assert err == [f"error: the checkpoint at step {latest} in {ours / 'checkpoints'} belongs to "
                 "a run of seed 1, not 0: give that seed to continue it, or start a new run "
                 "directory"], err
  assert tree_hashes(ours) == before


def test_a_data_folder_given_relative_or_absolute_is_the_same_run(tmp_path, monkeypatch):
  (tmp_path / "data").mkdir()
  workdir = tmp_path / "run"
  workdir.mkdir()
  record = {"experiment": "x", "config": {"data_dir": "data", "seed": 0}}
  (workdir / "config.json").write_text(json.dumps(record))
  monkeypatch.chdir(tmp_path)
  absolute = {"experiment": "x", "config": {"data_dir": str(tmp_path / "data"), "seed": 0}}
  assert check_workdir(workdir, absolute) is False  # same run; no checkpoint to resume
  other = tmp_path / "other"
  other.mkdir()
  with pytest.raises(ValueError, match=r"config\.data_dir: 'data' there"):
    check_workdir(workdir, {"experiment": "x", "config": {"data_dir": str(other), "seed": 0}})


def test_the_eta_takes_the_median_call_pace_not_a_compiling_call(tmp_path, monkeypatch):
  now = [0.0]
  monkeypatch.setattr("jaxtrain.train.progress.time.time", lambda: now[0])
  with RunMonitor(tmp_path, columns=["epoch", "step"], total_steps=1000, steps_per_epoch=100,
                  progress=False) as monitor:
    monitor.mark_compiled()
    # A call's records are logged when the next call is queued; the third
    # call compiled (100 s), the others took 1 s.
    for first, at in ((0, 0.0), (100, 1.0), (200, 101.0), (300, 102.0)):
      now[0] = at
      monitor.log_steps(np.arange(first + 1, first + 101), {"loss": np.ones(100)})
    line = monitor._epoch_line({"epoch": 4, "step": 400})
  # Paces 0.01, 1 and 0.01 s per step: the median, 0.01 s, times 600 steps left.
  assert line.endswith("eta 00:06"), line
