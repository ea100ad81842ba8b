"""Pixel regression: predict a hidden square of an MNIST digit from the rest.

    uv run python -m experiments.pixel_regression --data-dir ../shared/data/mnist

The lesson's training project. The centre ``--square`` x ``--square`` pixels
of each image are hidden (set to the training mean) and an MLP predicts them
from the other pixels. Inputs and targets are normalised with the training
set's pixel mean and standard deviation (computed on the training split only),
and the predictions are de-normalised to pixel units (0..255) for the metrics
and the pictures. The loss is the MSE of the normalised pixels plus an L2 term
(``--l2``, default 1e-5: ``l2 * sum(w ** 2)`` over the parameters). The
training files are split into training and validation sets (seeded); the
official test set (t10k) is evaluated once, with the epoch of the best
validation loss (early stopping after ``--patience`` epochs without an
improvement). The baseline is the training set's mean image of the square.

Writes, beside the run's usual files, ``predictions.png``: rows of test digits
as (input with the square hidden, the target, the prediction filled in).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxtrain
from experiments import _cli, _sweep
from jaxtrain import data, losses, models
from jaxtrain.core.optim import OptimizerConfig
from jaxtrain.core.regularize import Regularization
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.rundir.run import log_images, run


@dataclasses.dataclass(frozen=True)
class Config:
  """MNIST pixel regression: fill in a hidden square of each digit."""

  workdir: pathlib.Path = pathlib.Path("runs/pixel_regression")  # Run directory.
  seed: int = 0  # Seeds the validation split, initialisation and shuffling.
  data_dir: pathlib.Path | None = None  # MNIST IDX folder; default: tensorflow-datasets.
  square: int = 10  # Side of the hidden centre square, in pixels.
  val_fraction: float = 0.1  # Share of the training images held out for validation.
  limit: int = 0  # Use only the first N training and N test images (0: all).
  hidden: tuple[int, ...] = (512, 256)  # Hidden layer widths of the MLP.
  epochs: int = 40  # The most passes over the training set.
  patience: int = 5  # Stop after this many epochs without a better validation loss.
  batch_size: int = 64  # Mini-batch size.
  # The optimizer (its flags take no "optim." prefix).
  optim: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = OptimizerConfig(
      "adam", learning_rate=1e-3)
  # L1/L2 penalty terms in the loss and input noise (flags take no "reg." prefix).
  reg: Annotated[Regularization, tyro.conf.OmitArgPrefixes] = Regularization(l2=1e-5)
  # Compute dtype of the model; parameters and optimizer state stay float32 (fp16:
  # with dynamic loss scaling).
  precision: Literal["fp32", "bf16", "fp16"] = "fp32"
  # Write a jax.profiler trace of steps A+1..B into <workdir>/profile (e.g. 10:20).
  profile_steps: str | None = _cli.added_flag(None)
  # Decay of an exponential moving average of the parameters, evaluated beside them
  # as val_ema_loss etc. (a monitor may rank epochs by it); unset: no average.
  ema: float | None = None
  examples: int = 8  # Test digits drawn in predictions.png.
  overwrite: bool = False  # Replace a different run already in --workdir.
  # Experiment trackers to log to as well: mlflow, wandb, trackio (comma-separated).
  track: str | None = _cli.added_flag(None)
  # A grid or random search over the flags, one sub-run per member in <workdir>/members.
  sweep: Annotated[_sweep.SweepConfig, tyro.conf.OmitArgPrefixes] = _cli.added_flag(
      _sweep.SweepConfig())
  checkpoint: CheckpointConfig = CheckpointConfig()  # When to save; a rerun resumes.


def square_slice(config: Config) -> slice:
  if not 1 <= config.square <= 26:
    raise ValueError(f"--square must be in 1..26 (pixels of a 28x28 digit), got "
                     f"{config.square}")
  start = (28 - config.square) // 2
  return slice(start, start + config.square)


def make_task(images: np.ndarray, where: slice, mean: float, std: float) -> dict:
  """``{"inputs": image with the square hidden, "targets": the square}``,
  both normalised, flattened: a hidden pixel reads 0, the training mean."""
  x = (images.astype(np.float32)[..., 0] - mean) / std
  targets = x[:, where, where].reshape(len(x), -1).copy()
  x[:, where, where] = 0.0
  return {"inputs": x.reshape(len(x), -1), "targets": targets}


def load_data(config: Config):
  """Train, validation and test tasks, and the training pixels' (mean, std)."""
  if config.limit < 0:
    raise ValueError(f"--limit must be >= 0, got {config.limit}")
  if not 0.0 < config.val_fraction < 1.0:
    raise ValueError(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
  where = square_slice(config)
  parts = data.load_mnist(config.data_dir, arg="--data-dir")
  if config.limit:
    parts = {k: data.take(v, 0, min(config.limit, data.length(v))) for k, v in parts.items()}
  data_key = jaxtrain.key_for(jax.random.key(config.seed), "data")
  train, val = data.split(parts["train"], data_key,
                          (1 - config.val_fraction, config.val_fraction))
  pixels = train["inputs"].astype(np.float64)
  mean, std = float(pixels.mean()), float(pixels.std())
  tasks = [make_task(s["inputs"], where, mean, std) for s in (train, val, parts["test"])]
  return (*tasks, (mean, std))


def pixel_metrics(std: float):
  """Per-example MSE and MAE in pixel units (de-normalised: times ``std``)."""
  def metrics_fn(outputs, targets):
    error = (outputs - targets) * std
    return {"mse_px": jnp.mean(error ** 2, axis=-1), "mae_px": jnp.mean(jnp.abs(error), axis=-1)}
  return metrics_fn


def create_state(config: Config, std: float) -> jaxtrain.TrainState:
  """The MLP and its optimizer, initialised from the config's seed."""
  pixels = config.square ** 2
  model = models.MLP(hidden_sizes=config.hidden, outputs=pixels)
  return jaxtrain.create_train_state(
      model, config.optim.make(), jax.random.key(config.seed), np.zeros((1, 784), np.float32),
      loss_fn=losses.mse, metrics_fn=pixel_metrics(std), regularization=config.reg,
      ema_decay=config.ema, precision=config.precision)


def state_from_record(record: dict) -> jaxtrain.TrainState:
  """The state a run's config.json describes (``checkpoint.load`` calls it)."""
  return create_state(_cli.from_record(Config, record["config"]), record["pixels"]["std"])


def baseline(train: dict, test: dict, std: float) -> dict[str, float]:
  """Test MSE/MAE (pixel units) of predicting the training set's mean square."""
  error = (train["targets"].mean(0, keepdims=True) - test["targets"]) * std
  return {"mse_px": float(np.mean(error ** 2)), "mae_px": float(np.mean(np.abs(error)))}


def plot(path: pathlib.Path, test: dict, predicted: np.ndarray, where: slice,
         mean: float, std: float) -> None:
  """Rows of (input with the square hidden, target, prediction), in pixels."""
  from matplotlib.figure import Figure  # Lazy: matplotlib is slow to import.

  side = where.stop - where.start
  rows = len(predicted)
  fig = Figure(figsize=(4.8, 1.6 * rows), layout="constrained")
  axes = fig.subplots(rows, 3, squeeze=False)
  for i in range(rows):
    hidden = test["inputs"][i].reshape(28, 28) * std + mean
    target, filled = hidden.copy(), hidden.copy()
    target[where, where] = test["targets"][i].reshape(side, side) * std + mean
    filled[where, where] = predicted[i].reshape(side, side) * std + mean
    for ax, image, title in zip(axes[i], (hidden, target, filled),
                                ("input", "target", "prediction")):
      ax.imshow(np.clip(image, 0, 255), cmap="gray", vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title)
  fig.savefig(path, dpi=100)


def main(config: Config) -> None:
  if config.sweep != _sweep.SweepConfig():
    return _sweep.run(config, main, vmapped=())
  if config.patience < 1:
    raise ValueError(f"--patience must be >= 1, got {config.patience}")
  if config.examples < 1:
    raise ValueError(f"--examples must be >= 1, got {config.examples}")
  train_set, val_set, test_set, (mean, std) = load_data(config)
  state = create_state(config, std)
  fit_config = jaxtrain.FitConfig(
      epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
      early_stopping=jaxtrain.EarlyStopping("val_loss", patience=config.patience),
      profile_steps=config.profile_steps)
  record = {"experiment": "pixel_regression", "config": _cli.to_record(config),
            "fit": dataclasses.asdict(fit_config), "pixels": {"mean": mean, "std": std},
            "sizes": {k: len(v["targets"]) for k, v in
                      (("train", train_set), ("val", val_set), ("test", test_set))}}
  result = run(state, train_set, config=fit_config, workdir=config.workdir, record=record,
               val=val_set, test=test_set, overwrite=config.overwrite, track=config.track,
               checkpoint=config.checkpoint, build=_cli.builder(globals(), "state_from_record"))
  if result.test is None:  # a signal stopped the run (it said so): a rerun resumes it
    return
  base = baseline(train_set, test_set, std)
  shown = {k: v[: config.examples] for k, v in test_set.items()}
  predicted = np.asarray(jaxtrain.predict(result.state, shown["inputs"]))
  path = config.workdir / "predictions.png"
  if jaxtrain.engine.distributed.is_primary():
    plot(path, shown, predicted, square_slice(config), mean, std)
    log_images(config.workdir, {"predictions": path})  # TensorBoard, the trackers
  test = result.test
  print(f"test MSE {test['mse_px']:.1f} (mean-image baseline {base['mse_px']:.1f}, "
        f"{test['mse_px'] / base['mse_px']:.2f}x), MAE {test['mae_px']:.2f} "
        f"(baseline {base['mae_px']:.2f}) in pixel units 0..255, best epoch "
        f"{result.best.epoch}  ({len(test_set['targets'])} images)  ->  {path}")


if __name__ == "__main__":
  _cli.command(Config, main)
