"""Experiment trackers (MLflow, W&B offline, Trackio) through the command line:
a killed and resumed run leaves each store with every step once, equal to the
run's own metrics.csv and steps.jsonl, read back with each library's own reader."""

import csv
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import TIMED

mlflow = pytest.importorskip("mlflow", reason="the trackers dependency group is not installed")
pytest.importorskip("wandb", reason="the trackers dependency group is not installed")
pytest.importorskip("trackio", reason="the trackers dependency group is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in MLflow
ARGS = ["--samples", "500", "--batch-size", "40", "--checkpoint.every-epochs", "5"]


def _env(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
  env.update(WANDB_MODE="offline", TRACKIO_DIR=str(tmp_path / "trackio"),
             JAXTRAIN_CACHE_DIR=str(tmp_path / "cache"), WANDB_CACHE_DIR=str(tmp_path / "wbc"),
             WANDB_CONFIG_DIR=str(tmp_path / "wbconfig"), HOME=str(tmp_path / "home"))
  return env


def _cmd(workdir, *args):
  return [sys.executable, "-m", "experiments.two_moons", "--workdir", str(workdir),
          "--track", "mlflow,wandb,trackio", *ARGS, *args]


def _run(workdir, env, *args):
  done = subprocess.run(_cmd(workdir, *args), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _expected(workdir):
  """Name -> {step: value} from the run's own files (timing columns aside)."""
  out = {}
  for line in (workdir / "steps.jsonl").read_text().splitlines():
    record = json.loads(line)
    for key, value in record.items():
      if key != "step" and value is not None:
        out.setdefault(f"train/step_{key}", {})[record["step"]] = float(value)
  with open(workdir / "metrics.csv", newline="") as f:
    for row in csv.DictReader(f):
      for key, cell in row.items():
        if key not in ("epoch", "step", *TIMED) and cell not in ("", "nan"):
          out.setdefault(f"epoch/{key}", {})[int(row["step"])] = float(cell)
  return out


def _mlflow(workdir):
  from mlflow.tracking import MlflowClient

  ids = json.loads((workdir / "trackers.json").read_text())["mlflow"]
  client = MlflowClient(tracking_uri=ids["tracking_uri"])
  return {key: [(m.step, m.value) for m in client.get_metric_history(ids["run_id"], key)]
          for key in client.get_run(ids["run_id"]).data.metrics}


def _wandb(workdir):
  from jaxtrain.rundir import wandb_file

  run_id = json.loads((workdir / "trackers.json").read_text())["wandb"]["id"]
  files = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
  out = {}
  for path in files:
    for row in wandb_file.history(path):
      for key, value in row.items():
        if not key.startswith("_") and isinstance(value, (int, float)):
          out.setdefault(key, []).append((row["_step"], float(value)))
  return out, len(files)


def wandb_file_history(path):
  from jaxtrain.rundir import wandb_file

  return list(wandb_file.history(path))


def _trackio(workdir, env, media=False):
  ids = json.loads((workdir / "trackers.json").read_text())["trackio"]
  code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
          "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], run=sys.argv[2]), default=str))")
  done = subprocess.run([sys.executable, "-c", code, ids["project"], ids["name"]], env=env,
                        capture_output=True, text=True, timeout=60, check=True)
  out = {}
  for log in json.loads(done.stdout):
    for key, value in log.items():
      if key in ("step", "timestamp"):
        continue
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        out.setdefault(key, []).append((log["step"], float(value)))
      elif media and isinstance(value, dict):
        out.setdefault(key, []).append((log["step"], value))
  return out


def _check_once_and_equal(name, logged, expected):
  for key, values in expected.items():
    steps = [s for s, _ in logged.get(key, [])]
    assert sorted(steps) == sorted(set(steps)), f"{name} {key}: a step logged twice"
    assert sorted(steps) == sorted(values), f"{name} {key}: steps differ"
    for step, value in logged[key]:
      assert math.isclose(value, values[step], rel_tol=1e-6, abs_tol=1e-9), (name, key, step)


def _check_all(workdir, env):
  expected = _expected(workdir)
  assert expected["train/step_loss"] and expected["epoch/val_loss"]
  _check_once_and_equal("mlflow", _mlflow(workdir), expected)
  wandb_logged, sessions = _wandb(workdir)
  _check_once_and_equal("wandb", wandb_logged, expected)
  _check_once_and_equal("trackio", _trackio(workdir, env), expected)
  return sessions


def test_a_resumed_run_logs_each_step_once_to_every_tracker(tmp_path):
  """The redone steps after a checkpoint are not logged twice: a finished run's
  last checkpoint removed (as a kill before its final save), then continued."""
  env, workdir = _env(tmp_path), tmp_path / "runs" / "moons"
  first = _run(workdir, env, "--epochs", "12")
  assert "tracking: mlflow run" in first.stdout and "tracking: wandb offline" in first.stdout
  before = _mlflow(workdir)
  assert max(s for s, _ in before["epoch/val_loss"]) == 120  # 12 epochs of 10 steps
  shutil.rmtree(workdir / "checkpoints" / "120")  # the rerun resumes at step 100
  _run(workdir, env, "--epochs", "20")
  assert _check_all(workdir, env) == 2  # W&B: one offline run file per session
  assert len(json.loads((workdir / "trackers.json").read_text())) == 3
  assert (tmp_path / "runs" / "mlflow.db").exists()  # beside the run directories
  # Figures: curves.png at each session's end, and one logged after the run.
  code = ("import sys, numpy as np; from jaxtrain.rundir.run import log_images; "
          "log_images(sys.argv[1], {'later': np.ones((4, 4))})")
  subprocess.run([sys.executable, "-c", code, str(workdir)], cwd=ROOT, env=env, check=True,
                 timeout=120)
  from mlflow.tracking import MlflowClient

  ids = json.loads((workdir / "trackers.json").read_text())
  client = MlflowClient(tracking_uri=ids["mlflow"]["tracking_uri"])
  names = {a.path.split("/")[-1].split("+")[0] + "@" + a.path.split("+")[2]
           for a in client.list_artifacts(ids["mlflow"]["run_id"], "images")
           if not a.path.endswith("compressed.webp")}
  assert {"curves@120", "curves@200", "later@200"} <= names, names
  assert (tmp_path / "runs" / "mlartifacts").is_dir() and not (ROOT / "mlruns").exists()
  rows = [r for p in (workdir / "wandb").glob("offline-run-*/run-*.wandb")
          for r in wandb_file_history(p)]
  assert {(r["_step"], k) for r in rows for k in ("curves", "later")
          if r.get(f"{k}/_type") == "image-file"} == {
      (120, "curves"), (200, "curves"), (200, "later")}
  trackio_images = {(step, key) for key, values in _trackio(workdir, env, media=True).items()
                    for step, _ in values if key in ("curves", "later")}
  assert trackio_images == {(120, "curves"), (200, "curves"), (200, "later")}
  _check_torn_tail(tmp_path, sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))[0])


def _check_torn_tail(tmp_path, path):
  """A killed writer leaves a partial record: the W&B reader reads the rows before it."""
  from jaxtrain.rundir import wandb_file

  whole = list(wandb_file.history(path))
  assert [r["_step"] for r in whole if "train/step_loss" in r] == list(range(1, 121))
  data = path.read_bytes()
  torn = tmp_path / "torn.wandb"
  torn.write_bytes(data[: len(data) * 2 // 3])
  part = list(wandb_file.history(torn))
  assert 0 < len(part) < len(whole) and part == whole[: len(part)]
  with pytest.raises(ValueError, match="not a W&B run file"):
    list(wandb_file.history(path.parents[2] / "metrics.csv"))


def test_sigkill_mid_run_then_rerun_every_step_once(tmp_path):
  env, workdir = _env(tmp_path), tmp_path / "runs" / "moons"
  process = subprocess.Popen(_cmd(workdir, "--epochs", "150"), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
      checkpoints = workdir / "checkpoints"
      if checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 300
                                      for p in checkpoints.iterdir()):
        break
      time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()[-2000:]
    process.send_signal(signal.SIGKILL)
  finally:
    process.wait(timeout=60)
  _run(workdir, env, "--epochs", "150")
  _check_all(workdir, env)
  rows = (workdir / "metrics.csv").read_text().splitlines()
  assert len(rows) == 151


def test_a_tracker_not_installed_is_refused_before_anything_is_written(tmp_path):
  blocker = tmp_path / "site"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(
      "import sys\nsys.modules['wandb'] = None  # import wandb raises ImportError\n")
  env = {**_env(tmp_path), "PYTHONPATH": str(blocker)}
  workdir = tmp_path / "runs" / "moons"
  done = subprocess.run(_cmd(workdir, "--epochs", "2"), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert lines == [lines[-1]] and "wandb" in lines[0] and "jaxtrain[wandb]" in lines[0]
  assert not workdir.exists() and not (tmp_path / "runs" / "mlflow.db").exists()


def test_unknown_tracker_exits_2_naming_it(tmp_path):
  done = subprocess.run([sys.executable, "-m", "experiments.two_moons", "--workdir",
                         str(tmp_path / "run"), "--track", "mlflow,comet"], cwd=ROOT,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: track: unknown tracker 'comet'; choose from mlflow, wandb, trackio"]
  assert not (tmp_path / "run").exists()


def test_track_with_seeds_is_refused_in_one_line(tmp_path):
  """--seeds N trains every seed in one program without run directories."""
  done = subprocess.run([sys.executable, "-m", "experiments.two_moons", "--workdir",
                         str(tmp_path / "run"), "--seeds", "2", "--track", "mlflow"], cwd=ROOT,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: --seeds 2 writes seeds.csv, not a run per seed: --track mlflow cannot be "
      "combined with it (--sweep's members are runs, and are tracked)"]
  assert not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_start_is_one_line(tmp_path):
  env = {**_env(tmp_path), "MLFLOW_TRACKING_URI": "bogus://nowhere"}
  done = subprocess.run(_cmd(tmp_path / "run", "--epochs", "2"), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: track: mlflow could not start ("), lines
  assert "bogus://nowhere" in lines[0]
