"""Multi-process runs on jax.distributed (2 local processes x 2 CPU devices,
gloo collectives), started by ``python -m jaxtrain.launch``.

2 x 2 devices give the numbers of 1 process x 4 devices to float rounding, not
bit for bit: the cross-process all-reduce (gloo) adds the devices' gradients
in another order than XLA's in-process one. Between 2-process runs everything
is bitwise: an interrupted and resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# 320 training points in batches of 32: 10 steps per epoch, a save every epoch.
RUN = ["--samples", "400", "--devices", "4", "--checkpoint.every-epochs", "1"]
EPOCHS = 24


def env():
  out = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  out["PYTHONUNBUFFERED"] = "1"
  return out


def launch_command(workdir, *args, epochs=EPOCHS):
  return [sys.executable, "-m", "jaxtrain.launch", "-n", "2", "--cpu-devices", "2", "--grace",
          "3", "--", "-m", "experiments.two_moons", "--workdir", str(workdir), *RUN,
          "--epochs", str(epochs), *args]


def launch(workdir, *args, epochs=EPOCHS):
  done = subprocess.run(launch_command(workdir, *args, epochs=epochs), cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=240)
  return done.returncode, done.stdout, done.stderr


def rows(workdir):
  with open(pathlib.Path(workdir) / "metrics.csv", newline="") as f:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two") / "run"
  code, out, err = launch(workdir)
  assert code == 0, err[-3000:]
  return workdir, out


def test_two_processes_equal_one_process_of_four_devices(two_process_run, tmp_path):
  workdir, out = two_process_run
  one = tmp_path / "one"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.two_moons", "--workdir", str(one), *RUN, "--epochs",
       str(EPOCHS)], cwd=REPO, capture_output=True, text=True, timeout=240,
      env={**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert done.returncode == 0, done.stderr[-3000:]
  a, b = rows(one), rows(workdir)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for column in ("train_loss", "val_loss", "train_loss_running", "val_accuracy"):
    np.testing.assert_allclose([float(r[column]) for r in b], [float(r[column]) for r in a],
                               rtol=1e-5, err_msg=column)
  # Only process 0 reports and writes the run's files.
  epoch_lines = [line for line in out.splitlines() if f"epoch {EPOCHS}/{EPOCHS}" in line]
  assert epoch_lines and all(line.startswith("[0] ") for line in epoch_lines), epoch_lines
  assert not [line for line in out.splitlines() if line.startswith("[1] ")], out[-2000:]
  record = json.loads((workdir / "config.json").read_text())
  assert record["devices"]["process_count"] == 2 and record["devices"]["count"] == 4


def children(pid: int) -> dict[int, int]:
  """{rank: pid} of the launcher's children."""
  out = {}
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    for child in (task / "children").read_text().split():
      environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
      rank = [e for e in environ if e.startswith(b"JAX_PROCESS_ID=")]
      if rank:
        out[int(rank[0].split(b"=")[1])] = int(child)
  return out


def start_and_signal_rank(workdir, sig):
  """Starts the run; once a checkpoint of epoch 3 or later exists, sends
  ``sig`` to rank 1 alone. Returns (exit status, stdout, stderr)."""
  logs = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.log"
  out_file, err_file = open(f"{logs}.out", "w+"), open(f"{logs}.err", "w+")
  launcher = subprocess.Popen(launch_command(workdir), cwd=REPO, env=env(),
                              stdout=out_file, stderr=err_file, text=True)
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline and launcher.poll() is None:
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] \
        if checkpoints.is_dir() else []
    if steps and max(steps) >= 30:
      os.kill(children(launcher.pid)[1], sig)
      break
    time.sleep(0.01)
  launcher.wait(timeout=120)
  out_file.seek(0)
  err_file.seek(0)
  return launcher.returncode, out_file.read(), err_file.read()


def test_sigkill_of_one_rank_stops_the_other_and_a_rerun_is_the_same_run(two_process_run,
                                                                         tmp_path):
  workdir = tmp_path / "run"
  code, out, err = start_and_signal_rank(workdir, signal.SIGKILL)
  assert code != 0
  assert "rank 1 was killed by SIGKILL; stopping the other ranks" in err, err[-2000:]
  assert len(rows(workdir)) < EPOCHS
  code, out, err = launch(workdir)
  assert code == 0, err[-3000:]
  assert "resuming from the checkpoint" in out
  assert rows(workdir) == rows(two_process_run[0])
  assert (workdir / "steps.jsonl").read_bytes() == (two_process_run[0] / "steps.jsonl").read_bytes()


def test_sigterm_to_rank_1_alone_saves_once_and_both_exit_0(two_process_run, tmp_path):
  workdir = tmp_path / "run"
  code, out, err = start_and_signal_rank(workdir, signal.SIGTERM)
  assert code == 0, err[-3000:]
  saved = [line for line in out.splitlines() if "saved a checkpoint" in line]
  assert len(saved) == 1 and saved[0].startswith("[0] SIGTERM"), out[-2000:]
  assert len(rows(workdir)) < EPOCHS
  code, out, err = launch(workdir)
  assert code == 0, err[-3000:]
  assert rows(workdir) == rows(two_process_run[0])


def test_a_lost_rank_ends_the_other_within_the_heartbeat_naming_it(tmp_path):
  """Without a launcher (a host gone): the survivor exits non-zero once the
  lost rank misses its heartbeats, and JAX's error names the task."""
  from jaxtrain.launch import free_port

  address = f"127.0.0.1:{free_port()}"
  common = [sys.executable, "-m", "experiments.two_moons", "--workdir", str(tmp_path / "run"),
            *RUN, "--epochs", "1000", "--distributed.coordinator", address,
            "--distributed.num-processes", "2", "--distributed.heartbeat-seconds", "6"]
  ranks = [subprocess.Popen(common + ["--distributed.process-id", str(rank)], cwd=REPO,
                            env={**env(), "XLA_FLAGS":
                                 "--xla_force_host_platform_device_count=2"},
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{rank}.err", "w"))
           for rank in (0, 1)]
  checkpoints = tmp_path / "run" / "checkpoints"
  deadline = time.monotonic() + 120
  while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    if time.monotonic() > deadline or ranks[0].poll() is not None:
      for rank in ranks:
        rank.kill()
      errors = [(tmp_path / f"{r}.err").read_text()[-1500:] for r in (0, 1)]
      pytest.fail(f"no checkpoint; rank 0 returned {ranks[0].poll()}:\n" + "\n---\n".join(errors))
    time.sleep(0.05)
  ranks[1].kill()
  lost = time.monotonic()
  try:
    code = ranks[0].wait(timeout=60)
  finally:
    for rank in ranks:
      rank.kill()
  assert code != 0
  assert time.monotonic() - lost < 30
  # JAX names the lost task: "... unhealthy (stopped sending heartbeats):\n1"
  # or "Task 1 heartbeat timeout", depending on where the survivor waited.
  text = (tmp_path / "0.err").read_text()
  assert re.search(r"stopped sending heartbeats\):\s+1\b|Task 1 heartbeat timeout", text), text[-2000:]


def test_ranks_start_with_stop_signals_blocked_in_groups_of_their_own():
  """What makes a signal at any moment a stop request: a rank cannot die of a
  SIGTERM sent before it could answer it (pending until jaxtrain unblocks), and
  a Ctrl-C in the terminal reaches it once, through the launcher."""
  probe = ("import os, signal; blocked = signal.pthread_sigmask(signal.SIG_BLOCK, []); "
           "print(sorted(s.name for s in blocked), os.getpgid(0) == os.getpid())")
  done = subprocess.run([sys.executable, "-m", "jaxtrain.launch", "-n", "2", "--", "-c", probe],
                        cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert sorted(done.stdout.splitlines()) == ["[0] ['SIGINT', 'SIGTERM'] True",
                                              "[1] ['SIGINT', 'SIGTERM'] True"]


def wait_for_children(launcher, count=2):
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and launcher.poll() is None:
    try:
      ranks = children(launcher.pid)
    except FileNotFoundError:  # a child gone between listing and reading
      ranks = {}
    if len(ranks) == count:
      return ranks
    time.sleep(0.002)
  pytest.fail(f"the launcher did not start {count} ranks (status {launcher.poll()})")


def test_sigterm_to_the_launcher_as_its_ranks_start_stops_both_before_training(tmp_path):
  """The ranks get the signal in their first milliseconds, before Python has
  imported anything: each keeps it pending, both stop at the agreed start."""
  launcher = subprocess.Popen(launch_command(tmp_path / "run"), cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_children(launcher)
  launcher.send_signal(signal.SIGTERM)
  out, err = launcher.communicate(timeout=120)
  assert launcher.returncode == 0, err[-3000:]
  assert "[0] SIGTERM: stopped before training began; nothing to save" in out, out[-2000:]
  assert "Traceback" not in err and "preemption" not in err.lower(), err[-2000:]


def test_sigterm_to_the_launcher_while_it_imports_is_forwarded_not_fatal(tmp_path):
  """0.3 s in, ``python -m jaxtrain.launch`` is still importing jaxtrain (JAX):
  the signal waits for its handler and reaches both ranks as a stop request."""
  launcher = subprocess.Popen(launch_command(tmp_path / "run"), cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(0.3)
  launcher.send_signal(signal.SIGTERM)
  out, err = launcher.communicate(timeout=120)
  assert launcher.returncode == 0, err[-3000:]
  assert "[0] SIGTERM: stopped before training began; nothing to save" in out, out[-2000:]


def test_ctrl_c_in_the_terminal_stops_both_ranks_once_and_saves(tmp_path):
  """The terminal sends SIGINT to its foreground process group: the launcher's.
  Each rank receives it once (from the launcher), so it is a stop request,
  never a second Ctrl-C."""
  workdir = tmp_path / "run"
  launcher = subprocess.Popen(launch_command(workdir, epochs=1000), cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              process_group=0)
  checkpoints = workdir / "checkpoints"
  deadline = time.monotonic() + 180
  while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert time.monotonic() < deadline and launcher.poll() is None, launcher.poll()
    time.sleep(0.05)
  os.killpg(launcher.pid, signal.SIGINT)
  out, err = launcher.communicate(timeout=120)
  assert launcher.returncode == 0, err[-3000:]
  assert "second SIGINT" not in err and "[0] SIGINT: saved a checkpoint" in out, out[-2000:]


def test_the_default_cadence_checkpoints_two_processes_within_seconds(tmp_path):
  """A save due by time is agreed (its deadline a duration, never a sentinel
  that overflows): the first comes seconds into training, as in one process,
  not at the end."""
  workdir = tmp_path / "run"
  command = [c for c in launch_command(workdir, epochs=1000000)
             if c not in ("--checkpoint.every-epochs", "1")]
  launcher = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  steps, checkpoints = workdir / "steps.jsonl", workdir / "checkpoints"
  deadline = time.monotonic() + 120
  while not (steps.is_file() and steps.stat().st_size):
    assert time.monotonic() < deadline and launcher.poll() is None, launcher.poll()
    time.sleep(0.02)
  began = time.monotonic()
  while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert time.monotonic() < began + 60 and launcher.poll() is None, launcher.poll()
    time.sleep(0.02)
  first = time.monotonic() - began
  launcher.send_signal(signal.SIGTERM)
  out, err = launcher.communicate(timeout=120)
  assert launcher.returncode == 0, err[-3000:]
  assert first < 10.0, f"first checkpoint after {first:.1f} s of training"


# -- set-up errors (no processes started) -----------------------------------------

def test_the_environment_fills_what_the_flags_leave_unset(monkeypatch):
  from jaxtrain.engine.distributed import DistributedConfig

  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert DistributedConfig(process_id=1).resolved() == DistributedConfig(
      "10.0.0.1:1234", 4, 1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES must be an integer, got 'four'"):
    DistributedConfig().resolved()


@pytest.mark.parametrize("args,message", [
    (["--distributed.num-processes", "2", "--distributed.process-id", "0"],
     "needs --distributed.coordinator"),
    (["--distributed.coordinator", "localhost:1", "--distributed.num-processes", "2",
      "--distributed.process-id", "2"], "process-id must be in 0..1 for 2 processes, got 2"),
])
def test_incomplete_distributed_flags_fail_in_one_line(monkeypatch, args, message):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  done = subprocess.run([sys.executable, "-m", "experiments.two_moons", *args], cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and message in done.stderr, done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_launcher_refuses_nothing_to_run():
  done = subprocess.run([sys.executable, "-m", "jaxtrain.launch", "-n", "2"], cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=60)
  assert done.returncode == 2 and "nothing to run" in done.stderr, done.stderr
