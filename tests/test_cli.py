"""experiments.two_moons from the command line: files, --help, bad input, accuracy.

The experiment runs in-process through ``experiments._cli.main`` (what
``python -m experiments.two_moons`` calls), which is much faster than a new
interpreter per case; one test runs the real module in a subprocess to see
exactly what a user's terminal gets on stderr.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import typing

import pytest
import tyro

from experiments import _cli, two_moons
from jaxtrain.train.config import COLUMNS

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--samples", "200"]  # 160 training rows: 5 batches of 32




class _Stream(io.StringIO):
  """A captured stream that reports an encoding, as a terminal's stdout does
  (tyro draws its boxes with UTF-8 characters only when stdout is UTF-8)."""

  def __init__(self, encoding: str):
    super().__init__()
    self._encoding = encoding

  @property
  def encoding(self):
    return self._encoding


def cli(*args, encoding: str = "utf-8") -> tuple[int, str, str]:
  """Runs the experiment in-process; returns (exit status, stdout, stderr)."""
  out, err = _Stream(encoding), _Stream(encoding)
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      _cli.main(two_moons.Config, two_moons.main, args=[str(a) for a in args])
    except SystemExit as exit_:
      code = 0 if exit_.code is None else exit_.code
  return code, out.getvalue(), err.getvalue()


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A finished 2-epoch run directory (shared; tests copy it before touching it)."""
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  code, out, err = cli(*TINY, "--workdir", workdir)
  assert code == 0, err
  return workdir, out


def copy_of(tiny_run, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run[0], workdir)
  return workdir


# ------------------------------------------------------------------ normal runs


def test_tiny_run_writes_the_run_directory(tiny_run):
  workdir, out = tiny_run
  config = json.loads((workdir / "config.json").read_text())
  assert config["config"]["epochs"] == 2 and config["config"]["samples"] == 200
  assert config["fit"]["batch_size"] == 32

  with open(workdir / "metrics.csv", newline="") as f:
    header = next(csv.reader(f))
  assert header == ["epoch", "step", "train_loss", "train_accuracy", "val_loss",
                    "val_accuracy", "train_loss_running", "learning_rate", "seconds"]
  assert header == list(COLUMNS)
  rows = read_csv(workdir / "metrics.csv")
  assert [r["epoch"] for r in rows] == ["1", "2"]
  assert [r["step"] for r in rows] == ["5", "10"]
  for row in rows:
    for name in ("train_loss", "val_loss", "train_loss_running", "seconds"):
      assert float(row[name]) >= 0
    for name in ("train_accuracy", "val_accuracy"):
      assert 0 <= float(row[name]) <= 1

  records = [json.loads(line) for line in (workdir / "steps.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 11))
  assert all(isinstance(r["loss"], float) for r in records)

  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
  assert re.search(r"held-out accuracy 0\.\d{4}", out)
  assert "epoch 2/2" in out


def test_full_batch_writes_the_extra_run_and_overlays_it(tmp_path, monkeypatch):
  from jaxtrain import run as run_module

  plotted = []
  original = run_module.plot_curves

  def recording_plot(history, path, *, extra=None, **kwargs):
    plotted.append((pathlib.Path(path), extra))
    return original(history, path, extra=extra, **kwargs)

  monkeypatch.setattr(run_module, "plot_curves", recording_plot)
  workdir = tmp_path / "fb"
  code, out, err = cli(*TINY, "--full-batch", "--workdir", workdir)
  assert code == 0, err
  gd = workdir / "full_batch"
  for directory in (workdir, gd):
    for name in ("config.json", "metrics.csv", "steps.jsonl", "curves.png"):
      assert (directory / name).is_file(), directory / name
    assert any((directory / "tensorboard").iterdir())
  # Full batch: one step per epoch over all 160 training rows.
  assert [r["step"] for r in read_csv(gd / "metrics.csv")] == ["1", "2"]
  assert json.loads((gd / "config.json").read_text())["fit"]["batch_size"] == 160
  assert [r["step"] for r in read_csv(workdir / "metrics.csv")] == ["5", "10"]
  # The main run's curves.png overlays the full-batch run.
  main_plot = [extra for path, extra in plotted if path == workdir / "curves.png"]
  assert len(main_plot) == 1 and set(main_plot[0]) == {"full batch"}
  assert main_plot[0]["full batch"]["epoch"]["epoch"] == [1, 2]
  assert "full-batch GD: held-out accuracy" in out


def test_default_config_reaches_95_percent_held_out_accuracy(tmp_path):
  workdir = tmp_path / "default"
  code, out, err = cli("--workdir", workdir)
  assert code == 0, err
  accuracy = float(re.search(r"held-out accuracy (\d\.\d+)", out).group(1))
  assert accuracy >= 0.95, out[-500:]
  rows = read_csv(workdir / "metrics.csv")
  assert len(rows) == 100
  assert float(rows[-1]["val_accuracy"]) >= 0.95 - 1e-6  # 190/200 in float32 is 0.9499999


# ------------------------------------------------------------------------ --help


def _options(config_type, prefix="", defaults=None):
  """(flag, default as tyro prints it) for every field, nested configs included
  (with the nesting field's defaults, and without their prefix where the field
  says OmitArgPrefixes)."""
  hints = typing.get_type_hints(config_type, include_extras=True)
  for field in dataclasses.fields(config_type):
    default = (getattr(defaults, field.name) if defaults is not None
               else field.default if field.default is not dataclasses.MISSING
               else field.default_factory())
    name = prefix + field.name.replace("_", "-")
    if dataclasses.is_dataclass(default):
      omit = tyro.conf.OmitArgPrefixes in getattr(hints[field.name], "__metadata__", ())
      yield from _options(type(default), prefix if omit else f"{name}.", default)
    elif tyro.conf.UseAppendAction in getattr(hints[field.name], "__metadata__", ()):
      yield f"--{name}", None  # a flag given once per value: tyro says "(repeatable)"
    elif isinstance(default, tuple):
      yield f"--{name}", " ".join(map(str, default))
    else:
      yield f"--{name}", str(default)


def test_help_lists_every_option_with_its_default():
  code, out, err = cli("--help")
  assert code == 0 and err == ""
  text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
  options = list(_options(two_moons.Config))
  assert len(options) >= 17
  starts = {}
  for flag, _ in options:
    match = re.search(rf"(?<![\w.-]){re.escape(flag)}(?![\w.-])", text)
    assert match, f"{flag} missing from --help"
    starts[flag] = match.start()
  ends = sorted(starts.values()) + [len(text)]
  for flag, default in options:
    start = starts[flag]
    section = text[start:ends[ends.index(start) + 1]]
    shown = "(repeatable)" if default is None else f"(default: {default})"
    assert shown in section, (flag, section)


def test_accumulate_steps_counts_updates_and_is_recorded_only_when_set(tiny_run, tmp_path):
  workdir = tmp_path / "run"
  code, _, err = cli(*TINY, "--workdir", workdir, "--accumulate-steps", "2")
  assert code == 0, err
  plain = read_csv(tiny_run[0] / "metrics.csv")
  accumulated = read_csv(workdir / "metrics.csv")
  # Steps count optimizer updates: half as many, each of two micro-batches.
  steps_per_epoch = int(plain[0]["step"])  # 5 batches of 32
  assert [int(r["step"]) for r in accumulated] == [
      int(r["epoch"]) * -(-steps_per_epoch // 2) for r in plain]
  assert json.loads((workdir / "config.json").read_text())["config"]["accumulate_steps"] == 2
  assert json.loads((workdir / "config.json").read_text())["fit"]["accumulate_steps"] == 2
  assert "accumulate_steps" not in json.loads(
      (tiny_run[0] / "config.json").read_text())["config"]


# -------------------------------------------------------------------- bad input

BAD_INPUT = [
    (["--epochs", "0"], r"epochs", r"0"),
    (["--sweep", "learning_rate"], r"sweep", r"learning_rate"),
    (["--sweep", "nosuch=1,2"], r"sweep", r"nosuch"),
    (["--epochs", "-3"], r"epochs", r"-3"),
    (["--batch-size", "0"], r"batch[_-]size", r"0"),
    (["--batch-size", "100000"], r"batch[_-]size", r"100000"),
    (["--learning-rate", "abc"], r"learning[_-]rate", r"'?abc'?"),
    (["--learning-rate", "-1"], r"learning[_-]rate", r"-1(\.0)?"),
    (["--optimizer", "rmsprop"], r"optimizer", r"'?rmsprop'?"),
    (["--momentum", "1.5"], r"momentum", r"1\.5"),
    (["--dropout", "1.0"], r"dropout", r"1(\.0)?"),
    (["--clip-norm", "0"], r"clip[_-]norm", r"0(\.0)?"),
    (["--accumulate-steps", "0"], r"accumulate[_-]steps", r"0"),
    (["--accumulate-steps", "1000"], r"accumulate[_-]steps", r"1000"),
    (["--data", "disk"], r"data", r"'?disk'?"),
    (["--seeds", "2", "--data", "stream"], r"--seeds", r"stream"),
    (["--l1", "-0.5"], r"--l1", r"-0\.5"),
    (["--l2", "nan"], r"--l2", r"nan"),
    (["--input-noise", "-1"], r"--input-noise", r"-1(\.0)?"),
    (["--ema", "1.5"], r"--ema", r"1\.5"),
    (["--precision", "fp8"], r"precision", r"'?fp8'?"),
    (["--eps", "-1"], r"eps", r"-1(\.0)?"),
    (["--profile-steps", "5:2"], r"--profile-steps", r"'?5:2'?"),
    (["--profile-steps", "10:100000"], r"--profile-steps", r"100000"),
    # 5 steps per epoch: the int32 step counter would overflow (an 18-million-hour ETA).
    (["--epochs", "10000000000000"], r"--epochs .*int32 step counter .*2147483647",
     r"10000000000000"),
    (["--epochs", "429496730"], r"--epochs .*at most 429496729 epochs", r"429496730"),
    (["--distributed.heartbeat-seconds", "0"], r"--distributed\.heartbeat-seconds", r"0"),
    (["--distributed.num-processes", "0"], r"--distributed\.num-processes must be >= 1",
     r"0"),
]


def assert_one_line_error(code, out, err, name=None, value=None):
  assert code == 2, (code, out[-300:], err)
  assert "Traceback" not in out + err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  # The message itself, not a help box flattened into one line.
  assert not re.search(r"-{5,}|─|helptext", lines[0]), lines[0]
  if name is not None:
    assert re.search(name, lines[0]), lines[0]
  if value is not None:
    assert re.search(rf"(?<![\w.-]){value}(?![\w.])", lines[0]), lines[0]
  assert "epoch 1/" not in out  # nothing trained
  return lines[0]


@pytest.mark.parametrize("args, name, value", BAD_INPUT,
                         ids=[" ".join(case[0]) for case in BAD_INPUT])
def test_bad_input_fails_in_one_line_and_changes_nothing(tiny_run, tmp_path, args, name,
                                                          value):
  # Into an existing run with --overwrite: the bad input must be refused before
  # the old run is cleared.
  workdir = copy_of(tiny_run, tmp_path)
  before = snapshot(workdir)
  code, out, err = cli(*TINY, "--workdir", workdir, "--overwrite", *args)
  assert_one_line_error(code, out, err, name, value)
  assert snapshot(workdir) == before


def test_parse_error_on_a_narrow_terminal_is_still_one_whole_line(monkeypatch):
  monkeypatch.setenv("COLUMNS", "40")  # tyro wraps the message inside its box
  code, out, err = cli("--learning-rate", "abc")
  line = assert_one_line_error(code, out, err, r"learning[_-]rate", r"'?abc'?")
  assert "could not convert string to float: 'abc'" in line


def test_parse_error_line_does_not_depend_on_the_stdout_encoding():
  # e.g. PYTHONIOENCODING=latin-1 python -m experiments.two_moons --learning-rate abc
  code, out, err = cli("--learning-rate", "abc", encoding="ascii")
  assert_one_line_error(code, out, err, r"learning[_-]rate", r"'?abc'?")


def test_bad_input_leaves_no_new_run_directory(tmp_path):
  workdir = tmp_path / "new"
  code, out, err = cli(*TINY, "--workdir", workdir, "--epochs", "0")
  assert_one_line_error(code, out, err, r"epochs", r"0")
  assert not workdir.exists() or not any(workdir.iterdir())


def test_rerun_with_a_different_config_is_refused(tiny_run, tmp_path):
  workdir = copy_of(tiny_run, tmp_path)
  before = snapshot(workdir)
  code, out, err = cli(*TINY, "--workdir", workdir, "--learning-rate", "0.05")
  line = assert_one_line_error(code, out, err)
  assert "--overwrite" in line and str(workdir) in line
  assert snapshot(workdir) == before


def test_overwrite_replaces_the_run(tiny_run, tmp_path):
  workdir = copy_of(tiny_run, tmp_path)
  old_rows = read_csv(workdir / "metrics.csv")
  (workdir / "notes.txt").write_text("mine")  # not a run file: must survive
  code, out, err = cli(*TINY, "--workdir", workdir, "--seed", "1", "--overwrite")
  assert code == 0, err
  assert json.loads((workdir / "config.json").read_text())["config"]["seed"] == 1
  rows = read_csv(workdir / "metrics.csv")
  assert [r["epoch"] for r in rows] == ["1", "2"]
  assert [r["train_loss"] for r in rows] != [r["train_loss"] for r in old_rows]
  assert len((workdir / "steps.jsonl").read_text().splitlines()) == 10
  assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
  assert (workdir / "notes.txt").read_text() == "mine"


def test_bad_input_from_a_real_command_line(tiny_run, tmp_path):
  """What a terminal sees: one line on stderr, status 2 (no JAX/absl noise)."""
  workdir = copy_of(tiny_run, tmp_path)
  before = snapshot(workdir)
  env = {k: v for k, v in os.environ.items() if k != "JAXTRAIN_DEBUG"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.two_moons", *TINY, "--workdir", str(workdir),
       "--overwrite", "--batch-size", "100000"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, r"batch[_-]size", r"100000")
  assert snapshot(workdir) == before


def test_an_experiment_runs_by_its_file_path(tmp_path):
  """``python experiments/two_moons.py`` (no ``-m``: no module spec) names its
  state builder by the file's name."""
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / "two_moons.py"), *TINY,
                         "--workdir", str(workdir)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  record = json.loads((workdir / "config.json").read_text())
  assert record["build"] == "experiments.two_moons:state_from_record"


def test_a_reserved_record_key_is_refused_before_the_run_dir_is_touched(tiny_run, tmp_path):
  import jaxtrain
  from jaxtrain.rundir.run import run

  workdir = copy_of(tiny_run, tmp_path)
  before = snapshot(workdir)
  train, test = two_moons.load_data(two_moons.Config(samples=200))
  with pytest.raises(ValueError, match="reserved"):
    run(two_moons.create_state(two_moons.Config()), train, workdir=workdir, overwrite=True,
        config=jaxtrain.FitConfig(epochs=1, batch_size=32, progress=False),
        record={"backend": "mine"})
  assert snapshot(workdir) == before


def test_old_flat_optimizer_keys_rebuild_the_same_config():
  """config.json files written before the optimizer fields nested under 'optim'."""
  flat = {"learning_rate": 0.5, "momentum": 0.0, "epochs": 3}
  config = two_moons.config_from_record({"config": flat})
  assert config.optim.learning_rate == 0.5 and config.optim.momentum == 0.0
  assert config.optim.optimizer == "sgd" and config.epochs == 3
  nested = two_moons.config_from_record({"config": {"optim": {"learning_rate": 0.5}}})
  assert nested.optim.momentum == 0.9  # the experiment's default, not the class's


# ---------------------------------------------------------------------- signals


def _idx_bytes(array) -> bytes:
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype("uint8").tobytes()


@contextlib.contextmanager
def _signal_at_poll(at_poll: int):
  """run()'s signal handling, scripted: its ``at_poll``-th poll answers SIGTERM
  (poll 1 comes before the first compiled call, then one per call boundary)."""
  from jaxtrain.rundir import run as jrun

  @contextlib.contextmanager
  def fake():
    polls = []

    def should_stop():
      polls.append(1)
      return "SIGTERM" if len(polls) >= at_poll else None

    yield should_stop

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jrun, "stop_on_signals", fake)
    yield


@pytest.mark.parametrize("at_poll, flags, said", [
    (1, [], "SIGTERM: stopped before training began; nothing to save"),
    # Calls end at checkpoints: the second poll is at step 2 of 4 in epoch 1.
    (2, ["--checkpoint.every-steps", "2"],
     "SIGTERM: saved a checkpoint at step 2 (epoch 1, batch 2)"),
])
def test_pigeon_stopped_before_its_first_epoch_row_exits_0_saying_so(tmp_path, at_poll, flags,
                                                                     said):
  """It read the last epoch row of an empty history: IndexError, exit 1."""
  import numpy as np

  from experiments import mnist_pigeon

  data_dir = tmp_path / "mnist"
  data_dir.mkdir()
  rng = np.random.default_rng(0)
  for prefix in ("train", "t10k"):
    (data_dir / f"{prefix}-images-idx3-ubyte").write_bytes(
        _idx_bytes(rng.integers(0, 256, (96, 28, 28))))
    (data_dir / f"{prefix}-labels-idx1-ubyte").write_bytes(
        _idx_bytes(rng.integers(0, 10, 96)))
  workdir = tmp_path / "run"
  args = ["--data-dir", data_dir, "--workdir", workdir, "--train-size", "64", "--val-size",
          "32", "--batch-size", "16", "--epochs", "2", *flags]
  out, err = io.StringIO(), io.StringIO()
  with _signal_at_poll(at_poll), contextlib.redirect_stdout(out), \
      contextlib.redirect_stderr(err):
    _cli.main(mnist_pigeon.Config, mnist_pigeon.main, args=[str(a) for a in args])
  out, err = out.getvalue(), err.getvalue()
  assert "Traceback" not in out + err and "error" not in err, err
  lines = out.strip().splitlines()
  assert lines[-1].startswith(said), out[-1000:]
  assert "hidden 30" not in out  # no epoch to report
  assert read_csv(workdir / "metrics.csv") == []
