"""Reliability: run-directory lock, strict JSON step logs, diverged exit status,
adaptive checkpoint cadence, signals before training."""

import json
import os
import subprocess
import sys

import pytest

from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.rundir.run import RunDirError, RunDirLock
from tests.helpers import untimed_rows


def test_a_second_lock_on_a_run_directory_names_the_holder(tmp_path):
  held = RunDirLock(tmp_path)
  with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()}\)"):
    RunDirLock(tmp_path)
  held.release()
  RunDirLock(tmp_path).release()  # released: free again
  assert (tmp_path / ".lock").read_text() == ""


def test_non_finite_step_values_are_written_as_json_null(tmp_path):
  import numpy as np

  with RunMonitor(tmp_path, columns=["epoch"], total_steps=2, steps_per_epoch=2,
                  progress=False) as monitor:
    monitor.log_steps(np.array([1, 2]), {"loss": np.array([0.5, np.nan]),
                                         "grad_norm": np.array([np.inf, 1.0])})
  lines = (tmp_path / "steps.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "loss": 0.5, "grad_norm": None}, {"step": 2, "loss": None, "grad_norm": 1.0}]
  assert "NaN" not in "".join(lines) and "Infinity" not in "".join(lines)


def test_adaptive_cadence_saves_at_twenty_times_the_cost_within_bounds(tmp_path):
  checkpointer = Checkpointer(tmp_path, CheckpointConfig())
  try:
    assert checkpointer.save_interval() == 5.0  # the floor, before a save is measured
    checkpointer.save_seconds[:] = [1.0, 2.0, 1.0]
    assert checkpointer.save_interval() == pytest.approx(20.0)
    checkpointer.save_seconds[:] = [100.0]
    assert checkpointer.save_interval() == 300.0  # every_seconds stays the ceiling
  finally:
    checkpointer.close()
  assert Checkpointer(tmp_path, CheckpointConfig(adaptive=False)).save_interval() == 300.0
  assert Checkpointer(tmp_path, CheckpointConfig(every_seconds=0)).save_interval() == float("inf")


def test_a_diverged_run_exits_3_in_one_line_with_valid_json(tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-m", "experiments.two_moons", "--workdir",
                        str(workdir), "--learning-rate", "1e6", "--epochs", "2"],
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 3, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: training diverged")
  records = [json.loads(line, parse_constant=lambda c: pytest.fail(c))
             for line in (workdir / "steps.jsonl").read_text().splitlines()]
  assert records[-1]["loss"] is None and records[-1]["finite"] is False


def test_sigterm_in_the_first_second_exits_0_in_one_line(tmp_path):
  import signal
  import time

  child = subprocess.Popen([sys.executable, "-m", "experiments.two_moons", "--workdir",
                            str(tmp_path / "run")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
  time.sleep(1.0)  # importing JAX, before any training
  child.send_signal(signal.SIGTERM)
  out, err = child.communicate(timeout=300)
  assert child.returncode == 0, err
  assert "Traceback" not in err
  assert "SIGTERM: " in out and "run the same command" in out


# -- whole processes: concurrency, double Ctrl-C, the other modes' signals ---------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moons(workdir, *args):
  return [sys.executable, "-m", "experiments.two_moons", "--workdir", str(workdir), *args]


class start(subprocess.Popen):
  """A child writing into temporary files (a pipe nobody reads while it runs
  fills up and blocks its prints); ``communicate`` reads them at the end."""

  def __init__(self, command):
    import tempfile

    self.files = [tempfile.TemporaryFile("w+") for _ in range(2)]
    super().__init__(command, cwd=REPO, stdout=self.files[0], stderr=self.files[1],
                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

  def communicate(self, timeout=None):
    self.wait(timeout=timeout)
    out = []
    for f in self.files:
      f.seek(0)
      out.append(f.read())
      f.close()
    return tuple(out)


def wait_for(predicate, child, seconds=120):
  import time

  deadline = time.monotonic() + seconds
  while not predicate():
    if time.monotonic() > deadline or child.poll() is not None:
      child.kill()  # never left running (or waited on) after a failure
      out, err = child.communicate()
      pytest.fail(f"exit {child.returncode}; stdout {out[-1000:]!r}; stderr {err[-1000:]!r}")
    time.sleep(0.02)


def has_checkpoint(workdir):
  checkpoints = workdir / "checkpoints"
  return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def test_two_runs_at_once_one_exits_2_and_the_other_is_a_lone_run(tmp_path):
  lone, shared = tmp_path / "lone", tmp_path / "shared"
  # Long enough (seconds of training) that the first still holds the lock when the
  # second has started up.
  args = ["--epochs", "600", "--checkpoint.every-epochs", "200"]
  subprocess.run(moons(lone, *args), cwd=REPO, check=True, capture_output=True, timeout=300)
  first = start(moons(shared, *args))
  wait_for(lambda: (shared / ".lock").is_file() and (shared / ".lock").read_text(), first)
  second = subprocess.run(moons(shared, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert second.returncode == 2 and second.stderr.strip().splitlines() == [
      f"error: workdir {str(shared)!r} is in use by another run (pid {first.pid}); wait for "
      "it to end or choose another --workdir"], second.stderr
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  assert untimed_rows(shared / "metrics.csv") == untimed_rows(lone / "metrics.csv")
  assert (shared / "steps.jsonl").read_bytes() == (lone / "steps.jsonl").read_bytes()


def test_a_second_ctrl_c_aborts_in_one_line_and_the_checkpoint_stays(tmp_path):
  import signal

  workdir = tmp_path / "run"
  child = start(moons(workdir, "--epochs", "100000", "--checkpoint.every-epochs", "1"))
  wait_for(lambda: has_checkpoint(workdir), child)
  import time

  child.send_signal(signal.SIGINT)
  time.sleep(0.1)  # two pending SIGINTs are one: the first must be received
  child.send_signal(signal.SIGINT)
  out, err = child.communicate(timeout=120)
  assert child.returncode == 130, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  import jaxtrain

  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  state = jaxtrain.checkpoint.load(workdir)  # the latest checkpoint reads whole
  assert int(state.step) == steps[-1] > 0


def test_a_second_ctrl_c_inside_one_long_compiled_call_aborts_at_once(tmp_path):
  """Both SIGINTs land in one call of seconds (one 16,000-example step of a
  2048x2048 MLP): Python's handler would run only when it returns."""
  import signal
  import time

  workdir = tmp_path / "run"
  child = start(moons(workdir, "--epochs", "1000", "--samples", "20000", "--batch-size",
                      "16000", "--hidden", "2048", "2048", "--checkpoint.every-epochs", "1"))
  wait_for(lambda: has_checkpoint(workdir), child)
  time.sleep(0.3)  # inside the next call
  child.send_signal(signal.SIGINT)
  time.sleep(0.03)
  child.send_signal(signal.SIGINT)
  sent = time.monotonic()
  try:
    out, err = child.communicate(timeout=60)
  finally:
    child.kill()
  took = time.monotonic() - sent
  assert child.returncode == 130, f"exit {child.returncode} {took:.1f} s after: {err}"
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert took < 2.0, f"exited {took:.1f} s after the second SIGINT"
  import jaxtrain

  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  state = jaxtrain.checkpoint.load(workdir)  # the latest checkpoint reads whole
  assert int(state.step) == steps[-1] > 0


@pytest.mark.parametrize("mode", ["--full-batch", "--seeds"])
def test_sigterm_in_another_mode_exits_0_and_the_rerun_is_a_lone_run(tmp_path, mode):
  import signal
  import time

  args = (["--epochs", "100", "--full-batch"] if mode == "--full-batch" else
          ["--epochs", "10000", "--seeds", "4"])  # ~4 s of training: the signal lands in it
  lone, workdir = tmp_path / "lone", tmp_path / "run"
  subprocess.run(moons(lone, *args), cwd=REPO, check=True, capture_output=True, timeout=300)
  child = start(moons(workdir, *args))
  if mode == "--full-batch":  # mid-way through its first (full-batch) run
    log = workdir / "full_batch" / "metrics.csv"
    wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) > 2, child)
  else:  # --seeds writes nothing before it ends: after start-up, while it compiles or trains
    time.sleep(3.5)
  child.send_signal(signal.SIGTERM)
  out, err = child.communicate(timeout=120)
  assert child.returncode == 0 and "Traceback" not in err, err
  assert "SIGTERM" in out, out[-1000:]
  rerun = subprocess.run(moons(workdir, *args), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  for name in (["metrics.csv", "full_batch/metrics.csv"] if mode == "--full-batch"
               else ["seeds.csv"]):
    assert untimed_rows(workdir / name) == untimed_rows(lone / name), name


def test_the_default_cadence_checkpoints_within_the_first_half_of_a_20_s_run(tmp_path):
  """Adaptive: the first time-based save once 5 s have passed (20x a save's
  cost is far less here), not after the 300 s ceiling."""
  import signal
  import time

  workdir = tmp_path / "run"
  child = start(moons(workdir, "--epochs", "1000000"))  # minutes of training
  steps = workdir / "steps.jsonl"
  wait_for(lambda: steps.is_file() and steps.stat().st_size > 0, child)
  began = time.monotonic()
  wait_for(lambda: has_checkpoint(workdir), child, seconds=60)
  first = time.monotonic() - began
  child.send_signal(signal.SIGTERM)
  try:
    out, err = child.communicate(timeout=60)
  finally:
    child.kill()
  assert child.returncode == 0, err
  assert first < 10.0, f"first checkpoint after {first:.1f} s of training"


def test_a_run_stopped_by_a_signal_hands_it_back_and_one_that_was_not_forgets():
  """The command line's handler (experiments._signals) stays the judge of a
  second SIGINT after the run: a run stopped by SIGTERM leaves the request
  pending (a SIGINT while curves are drawn aborts); a run that got none
  forgets, so the next SIGINT is a first one."""
  import signal

  from jaxtrain.rundir.run import stop_on_signals

  forgotten = []

  def command_line(signum, frame):
    command_line.received.append(signal.Signals(signum).name)

  command_line.received = []
  command_line.forget = lambda: forgotten.append(True)
  before = signal.signal(signal.SIGTERM, command_line)
  try:
    with stop_on_signals() as should_stop:
      assert should_stop() is None
      os.kill(os.getpid(), signal.SIGTERM)
      assert should_stop() == "SIGTERM"
      assert command_line.received == []  # the run answers it, not the command line
    assert command_line.received == ["SIGTERM"] and forgotten == []
    with stop_on_signals() as should_stop:  # a later run adopts it: it stops at once
      assert should_stop() == "SIGTERM"
    command_line.received.clear()
    with stop_on_signals() as should_stop:
      assert should_stop() is None
    assert command_line.received == [] and forgotten == [True]
  finally:
    signal.signal(signal.SIGTERM, before)
