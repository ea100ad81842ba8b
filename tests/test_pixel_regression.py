"""experiments.pixel_regression: the task's construction, its pixel-unit
metrics, the baseline and the picture."""

import csv

import numpy as np
import pytest

from experiments import _cli, pixel_regression


def test_the_task_hides_the_square_and_targets_it_normalised():
  images = np.arange(2 * 28 * 28, dtype=np.float64).reshape(2, 28, 28, 1) % 256
  config = pixel_regression.Config(square=4)
  where = pixel_regression.square_slice(config)
  assert (where.start, where.stop) == (12, 16)
  task = pixel_regression.make_task(images.astype(np.uint8), where, mean=100.0, std=50.0)
  x = task["inputs"].reshape(2, 28, 28)
  assert np.all(x[:, 12:16, 12:16] == 0)  # hidden: the training mean, normalised
  np.testing.assert_allclose(x[:, 0, 0], (images[:, 0, 0, 0] - 100) / 50)
  np.testing.assert_allclose(task["targets"].reshape(2, 4, 4),
                             (images[:, 12:16, 12:16, 0] - 100) / 50, rtol=1e-6)


def test_a_short_run_reports_pixel_units_and_draws_predictions(mnist_path, tmp_path, capsys):
  workdir = tmp_path / "run"
  pixel_regression.main(pixel_regression.Config(
      workdir=workdir, data_dir=mnist_path, limit=600, epochs=3, hidden=(64,)))
  train, _, test, (mean, std) = pixel_regression.load_data(
      pixel_regression.Config(data_dir=mnist_path, limit=600))
  with open(workdir / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  # De-normalised: the pixel MSE is the normalised MSE (the loss) times std**2.
  for row in rows:
    assert float(row["val_mse_px"]) == pytest.approx(float(row["val_loss"]) * std ** 2,
                                                     rel=1e-4)
    assert float(row["train_penalty"]) > 0  # --l2 1e-5 by default
  base = pixel_regression.baseline(train, test, std)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert f"mean-image baseline {base['mse_px']:.1f}" in line and "pixel units" in line
  assert (workdir / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The statistics are the training split's own: its pixels, normalised, have
  # mean 0 and std 1 (the validation split's do not, exactly).
  where = pixel_regression.square_slice(pixel_regression.Config())
  full = train["inputs"].reshape(-1, 28, 28).astype(np.float64)
  full[:, where, where] = train["targets"].reshape(-1, 10, 10)
  assert abs(full.mean()) < 1e-6 and full.std() == pytest.approx(1.0, abs=1e-6)
  assert 0 < std < 255 and 0 < mean < 255


def test_the_baseline_is_the_mean_square_of_the_training_set():
  train = {"targets": np.array([[0.0, 2.0], [2.0, 2.0]])}
  test = {"targets": np.array([[1.0, 1.0]])}
  out = pixel_regression.baseline(train, test, std=10.0)
  assert out == {"mse_px": pytest.approx(50.0), "mae_px": pytest.approx(5.0)}


@pytest.mark.parametrize("args, named", [(["--square", "0"], "--square"),
                                         (["--square", "27"], "--square"),
                                         (["--patience", "0"], "--patience"),
                                         (["--l2", "-1e-5"], "--l2")])
def test_bad_values_exit_2_naming_the_flag(args, named, tmp_path, capsys, mnist_path):
  with pytest.raises(SystemExit) as exit_:
    _cli.main(pixel_regression.Config, pixel_regression.main,
              args=["--workdir", str(tmp_path / "run"), "--data-dir", str(mnist_path), *args])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and len(err.splitlines()) == 1 and named in err, err
  assert not (tmp_path / "run").exists()
