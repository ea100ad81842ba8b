"""The MNIST experiments end to end (tiny configs) and their handling of bad input.

The end-to-end tests need the shared MNIST IDX files (``mnist_path`` skips without
them); the bad-input tests build their own files in ``tmp_path``.
"""

import csv
import gzip
import importlib
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from experiments import _cli, mnist_cnn, mnist_pigeon
from jaxtrain import models

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = {"mnist_pigeon": mnist_pigeon, "mnist_cnn": mnist_cnn}
# Tiny configs: one epoch on a few hundred images.
TINY = {
    "mnist_pigeon": ["--epochs", "1", "--train-size", "256", "--val-size", "128",
                     "--learning-rate", "0.05", "--eval-every-steps", "4"],
    "mnist_cnn": ["--epochs", "1", "--limit", "512", "--batch-size", "64",
                  "--features", "8", "--dense", "16", "--warmup-epochs", "0.5"],
}




def _metrics(workdir):
  with open(workdir / "metrics.csv", newline="") as f:
    return list(csv.DictReader(f))


def _assert_run_dir(workdir, experiment):
  png = (workdir / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  record = json.loads((workdir / "config.json").read_text())
  assert record["experiment"] == experiment
  rows = _metrics(workdir)
  assert [int(r["epoch"]) for r in rows] == [1]
  for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
    assert math.isfinite(float(rows[0][name])), name
  for name in ("train_accuracy", "val_accuracy"):
    assert 0.0 <= float(rows[0][name]) <= 1.0
  return record, rows[0]


def _assert_rebuilds(module, record, args, *create_args):
  """checkpoint.load's hook: the builder config.json names -> the run's initial
  state (without reading the data)."""
  assert record["build"] == f"{module.__name__}:state_from_record"
  module_name, function = record["build"].split(":")
  rebuilt = getattr(importlib.import_module(module_name), function)(record)
  original = module.create_state(_cli.parse(module.Config, args), *create_args)
  arrays = lambda state: (state.params, state.batch_stats, state.opt_state)  # noqa: E731
  assert jax.tree.structure(arrays(rebuilt)) == jax.tree.structure(arrays(original))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rebuilt.params),
                                                  jax.tree.leaves(original.params)))


def test_pigeon_end_to_end(mnist_path, tmp_path, capsys):
  workdir = tmp_path / "run"
  args = ["--data-dir", str(mnist_path), "--workdir", str(workdir), *TINY["mnist_pigeon"]]
  _cli.main(mnist_pigeon.Config, mnist_pigeon.main, args=args)
  record, row = _assert_run_dir(workdir, "mnist_pigeon")
  assert record["config"]["hidden"] == 30 and record["config"]["train_size"] == 256
  assert int(row["step"]) == 256 // 32
  # 8 steps: still mostly "no", but the loss has left log(2), where it starts.
  assert float(row["train_loss"]) < 0.65 and float(row["val_loss"]) < 0.65
  steps = [json.loads(line) for line in (workdir / "steps.jsonl").read_text().splitlines()]
  evaluated = [s["step"] for s in steps if s.get("val_accuracy") is not None
               and math.isfinite(s["val_accuracy"])]
  assert evaluated == [4, 8]  # --eval-every-steps 4: the per-iteration curves
  assert "hidden 30: train accuracy" in capsys.readouterr().out
  _assert_rebuilds(mnist_pigeon, record, args)


def test_pigeon_data_is_first_and_next_images_with_binary_targets(mnist_path):
  config = mnist_pigeon.Config(data_dir=mnist_path, train_size=100, val_size=50)
  train, val = mnist_pigeon.load_data(config)
  assert train["inputs"].shape == (100, 784) and val["inputs"].shape == (50, 784)
  assert train["inputs"].dtype == np.float32
  assert 0.0 <= train["inputs"].min() and train["inputs"].max() == 1.0
  assert train["targets"].dtype == np.int32
  # The README's first training labels: 5 0 4 1 9 2 1 3 ... -> digit < 3?
  assert train["targets"][:8].tolist() == [0, 1, 0, 1, 0, 1, 1, 0]
  raw = jaxtrain.data.load_mnist(mnist_path, splits=("train",))["train"]
  np.testing.assert_array_equal(val["targets"], (raw["targets"][100:150] < 3).astype(np.int32))


def test_pigeon_torch_init_matches_nn_linear_bounds():
  model = models.Pigeon(60, init_style="torch")
  params = model.init(jax.random.key(0), jnp.zeros((1, 784)), train=False)["params"]
  assert jax.tree.map(jnp.shape, params) == {
      "Dense_0": {"kernel": (784, 60), "bias": (60,)},
      "Dense_1": {"kernel": (60, 1), "bias": (1,)}}
  for layer, fan_in in (("Dense_0", 784), ("Dense_1", 60)):
    for leaf in params[layer].values():
      assert float(jnp.max(jnp.abs(leaf))) <= fan_in ** -0.5
  kernel = np.asarray(params["Dense_0"]["kernel"])  # U(-b, b) has variance b^2 / 3
  assert abs(kernel.var() * 784 * 3 - 1) < 0.02
  assert float(jnp.std(params["Dense_0"]["bias"])) > 0  # not zeros, unlike flax


def test_cnn_end_to_end_on_all_devices(mnist_path, tmp_path, capsys):
  workdir = tmp_path / "run"
  args = ["--data-dir", str(mnist_path), "--workdir", str(workdir), *TINY["mnist_cnn"]]
  _cli.main(mnist_cnn.Config, mnist_cnn.main, args=args)
  record, row = _assert_run_dir(workdir, "mnist_cnn")
  assert record["fit"]["devices"] == jax.local_device_count() == 4  # --devices 0: all
  assert record["sizes"] == {"train": 461, "val": 51, "test": 512}
  assert int(row["step"]) == 461 // 64  # drop_remainder: full batches only
  assert float(row["learning_rate"]) < record["config"]["learning_rate"]  # cosine
  out = capsys.readouterr().out
  test_accuracy = float(out.split("test accuracy ")[1].split()[0])
  assert 0.12 < test_accuracy <= 1.0  # 7 steps, BN running stats still warming: above chance
  _assert_rebuilds(mnist_cnn, record, args, record["sizes"]["train"])


def test_cnn_split_is_seeded(mnist_path):
  config = mnist_cnn.Config(data_dir=mnist_path, limit=300)
  train, val, test = mnist_cnn.load_data(config)
  again = mnist_cnn.load_data(config)
  other = mnist_cnn.load_data(mnist_cnn.Config(data_dir=mnist_path, limit=300, seed=1))
  assert (len(train["targets"]), len(val["targets"]), len(test["targets"])) == (270, 30, 300)
  assert train["inputs"].shape[1:] == (28, 28, 1) and train["inputs"].dtype == np.float32
  np.testing.assert_array_equal(val["inputs"], again[1]["inputs"])
  assert not np.array_equal(val["inputs"], other[1]["inputs"])


def test_cnn_augment_shifts_by_at_most_two_pixels():
  augment = jax.jit(mnist_cnn.make_augment(2))
  image = np.zeros((28, 28, 1), np.float32)
  image[10:14, 12:15] = np.arange(12, dtype=np.float32).reshape(4, 3, 1) + 1
  offsets = set()
  for i in range(40):
    out = np.asarray(augment(jax.random.key(i), image))
    assert out.shape == image.shape and out.sum() == image.sum()  # a pure shift
    ys, xs = np.nonzero(out[..., 0] == 1.0)
    offsets.add((int(ys[0]) - 10, int(xs[0]) - 12))
    np.testing.assert_array_equal(out, augment(jax.random.key(i), image))  # seeded
  assert all(abs(dy) <= 2 and abs(dx) <= 2 for dy, dx in offsets)
  assert len(offsets) > 10  # the keys do move it


# ----------------------------------------------------------------------------- bad input


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _bad_data_dir(kind: str, tmp_path: pathlib.Path) -> tuple[pathlib.Path, str]:
  """A --data-dir of the given kind and a string its error line must name."""
  if kind == "missing":
    path = tmp_path / "no_such_dir"
    return path, "--data-dir"
  path = tmp_path / kind
  path.mkdir()
  if kind == "empty":
    return path, "train-images-idx3-ubyte"
  # truncated: valid labels, an images file cut short (header says 8 images).
  labels = np.arange(8) % 10
  images = np.zeros((8, 28, 28), np.uint8)
  for prefix in ("train", "t10k"):
    (path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    (path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(images)[:-100])
  return path, "train-images-idx3-ubyte"


def _snapshot(directory: pathlib.Path):
  return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _existing_run(tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "previous"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"experiment": "earlier"}\n')
  (workdir / "metrics.csv").write_text("epoch,step\n1,10\n")
  (workdir / "notes.txt").write_text("mine\n")
  return workdir


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
@pytest.mark.parametrize("kind", ["missing", "empty", "truncated"])
def test_bad_data_dir_exits_2_in_one_line_and_keeps_the_run_dir(
    experiment, kind, tmp_path, capsys):
  data_dir, named = _bad_data_dir(kind, tmp_path)
  workdir = _existing_run(tmp_path)
  before = _snapshot(workdir)
  module = EXPERIMENTS[experiment]
  with pytest.raises(SystemExit) as exit_:
    # --overwrite: the data must be checked before anything in the run dir goes.
    _cli.main(module.Config, module.main,
              args=["--data-dir", str(data_dir), "--workdir", str(workdir), "--overwrite"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1, err
  assert err.startswith("error: ") and named in err and str(data_dir) in err
  assert "Traceback" not in err
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_bad_data_dir_as_a_command(experiment, tmp_path):
  data_dir, named = _bad_data_dir("truncated", tmp_path)
  workdir = _existing_run(tmp_path)
  before = _snapshot(workdir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAXTRAIN_DEBUG", None)
  proc = subprocess.run(
      [sys.executable, "-m", f"experiments.{experiment}", "--data-dir", str(data_dir),
       "--workdir", str(workdir), "--overwrite", *TINY[experiment]],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
  assert "truncated payload" in proc.stderr and "Traceback" not in proc.stderr
  assert proc.stdout == ""
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_existing_run_dir_is_refused_without_overwrite(experiment, mnist_path, tmp_path, capsys):
  workdir = _existing_run(tmp_path)
  before = _snapshot(workdir)
  module = EXPERIMENTS[experiment]
  with pytest.raises(SystemExit) as exit_:
    _cli.main(module.Config, module.main,
              args=["--data-dir", str(mnist_path), "--workdir", str(workdir)])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "--overwrite" in err
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("args, named", [
    (["--train-size", "6000", "--val-size", "1"], "--train-size"),
    (["--val-size", "0"], "--val-size"),
    (["--hidden", "0"], "hidden"),
    (["--init", "xavier"], "--init"),
])
def test_pigeon_bad_sizes_exit_2(args, named, mnist_path, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    _cli.main(mnist_pigeon.Config, mnist_pigeon.main,
              args=["--data-dir", str(mnist_path), "--workdir", str(tmp_path / "run"), *args])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and named in err, err


def test_cnn_sigterm_saves_says_so_and_exits_0(mnist_path, tmp_path):
  """A signal mid-run: one line saying where it saved, exit 0, no traceback
  (it used to fail on the missing test metrics), and a rerun finishes the run."""
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "experiments.mnist_cnn", "--data-dir", str(mnist_path),
          "--workdir", str(workdir), *TINY["mnist_cnn"], "--epochs", "200",
          "--checkpoint.every-epochs", "1"]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / "checkpoints"
  deadline = time.monotonic() + 120
  while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "Traceback" not in out + err
  assert "SIGTERM: saved a checkpoint" in out and "test accuracy" not in out, out[-2000:]
  # One more epoch than the checkpoint holds ("at step S (epoch E, batch B)":
  # E - 1 done when B is 0); fewer than it holds would be refused.
  epoch, batch = map(int, re.search(r"\(epoch (\d+), batch (\d+)\)", out).groups())
  done = subprocess.run(args[:-4] + ["--epochs", str(epoch + bool(batch)),
                                     "--checkpoint.every-epochs", "1"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and "test accuracy" in done.stdout, done.stderr[-2000:]
