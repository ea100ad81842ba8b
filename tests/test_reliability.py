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
