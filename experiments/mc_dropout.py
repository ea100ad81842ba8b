"""Monte Carlo dropout on two moons: a picture of the model's uncertainty.

    uv run python -m experiments.mc_dropout
    uv run python -m experiments.mc_dropout --dropout 0.3 --mc-samples 200

An MLP with dropout after each hidden layer (2-64-64-2, dropout 0.2, Adam
0.01, batches of 32) is trained on two moons as in ``experiments.two_moons``.
Then, as the lesson on the training loop says, samples are fired through it in
evaluation mode with dropout still on: ``jaxtrain.predict(state, grid,
key=..., mc_samples=N)`` draws N masks (one program, vmapped) and gives the
predictive mean and variance of p(class 1) over the input plane. Writes
``uncertainty.png`` (mean and variance maps with the training points) beside the
usual run files, and prints the held-out accuracy of the deterministic net and
of the MC mean.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated, Literal

import jax
import numpy as np
import tyro

import jaxtrain
from experiments import _cli, two_moons
from jaxtrain.core.optim import OptimizerConfig
from jaxtrain.core.regularize import Regularization
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.rundir.run import log_images, run


@dataclasses.dataclass(frozen=True)
class Config:
  """Two moons with dropout; MC dropout's uncertainty over the input plane."""

  workdir: pathlib.Path = pathlib.Path("runs/mc_dropout")  # Run directory.
  seed: int = 0  # Seeds data, initialisation, shuffling, dropout and the MC masks.
  samples: int = 1000  # Points drawn.
  noise: float = 0.2  # Standard deviation of the Gaussian noise.
  test_fraction: float = 0.2  # Held-out share, evaluated every epoch.
  hidden: tuple[int, ...] = (64, 64)  # Hidden layer widths.
  dropout: float = 0.2  # Dropout rate after each hidden layer (> 0 for MC dropout).
  epochs: int = 60  # Passes over the training set.
  batch_size: int = 32  # Mini-batch size.
  # The optimizer (its flags take no "optim." prefix).
  optim: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = OptimizerConfig(
      "adam", learning_rate=0.01)
  # L1/L2 penalty terms in the loss and input noise (flags take no "reg." prefix).
  reg: Annotated[Regularization, tyro.conf.OmitArgPrefixes] = _cli.added_flag(Regularization())
  # Compute dtype of the model; parameters and optimizer state stay float32 (fp16:
  # with dynamic loss scaling).
  precision: Literal["fp32", "bf16", "fp16"] = _cli.added_flag("fp32")
  # Write a jax.profiler trace of steps A+1..B into <workdir>/profile (e.g. 10:20).
  profile_steps: str | None = _cli.added_flag(None)
  # Decay of an exponential moving average of the parameters, evaluated beside them
  # as val_ema_loss etc. (a monitor may rank epochs by it); unset: no average.
  ema: float | None = _cli.added_flag(None)
  mc_samples: int = 100  # Dropout masks drawn per point of the map.
  grid: int = 120  # Points per side of the map.
  overwrite: bool = False  # Replace a different run already in --workdir.
  # Experiment trackers to log to as well: mlflow, wandb, trackio (comma-separated).
  track: str | None = _cli.added_flag(None)
  checkpoint: CheckpointConfig = CheckpointConfig()  # When to save; a rerun resumes.


def moons_config(config: Config) -> two_moons.Config:
  return two_moons.Config(seed=config.seed, samples=config.samples, noise=config.noise,
                          test_fraction=config.test_fraction, hidden=config.hidden,
                          dropout=config.dropout, optim=config.optim, reg=config.reg,
                          ema=config.ema, precision=config.precision)


def state_from_record(record: dict) -> jaxtrain.TrainState:
  """The state a run's config.json describes (``checkpoint.load`` calls it)."""
  return two_moons.create_state(moons_config(_cli.from_record(Config, record["config"])))


def plane(train_x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A ``size`` x ``size`` grid over the data's range, one unit beyond it."""
  low, high = train_x.min(0) - 1.0, train_x.max(0) + 1.0
  xs, ys = np.linspace(low[0], high[0], size), np.linspace(low[1], high[1], size)
  gx, gy = np.meshgrid(xs, ys)
  return gx, gy, np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)


def plot(path: pathlib.Path, gx, gy, mean, variance, train) -> None:
  from matplotlib.figure import Figure  # Lazy: matplotlib is slow to import.

  fig = Figure(figsize=(11, 4.6), layout="constrained")
  for ax, values, title, cmap in zip(
      fig.subplots(1, 2), (mean, variance),
      ("MC mean of p(class 1)", "MC predictive variance of p(class 1)"),
      ("RdBu_r", "viridis")):
    image = ax.contourf(gx, gy, values.reshape(gx.shape), levels=20, cmap=cmap)
    fig.colorbar(image, ax=ax)
    for label, color in ((0, "tab:blue"), (1, "tab:red")):
      points = train["inputs"][train["targets"] == label]
      ax.scatter(points[:, 0], points[:, 1], s=6, c=color, edgecolors="white",
                 linewidths=0.3, label=f"class {label}")
    ax.set_title(title)
    ax.set_xlabel("x1 (standardised)")
    ax.set_ylabel("x2 (standardised)")
  fig.axes[0].legend(loc="upper right", fontsize=8)
  fig.savefig(path, dpi=110)


def main(config: Config) -> None:
  if not 0.0 < config.dropout < 1.0:
    raise ValueError(f"--dropout must be in (0, 1) for MC dropout, got {config.dropout}")
  if config.mc_samples < 2:
    raise ValueError(f"--mc-samples must be >= 2, got {config.mc_samples}")
  if config.grid < 2:
    raise ValueError(f"--grid must be >= 2, got {config.grid}")
  moons = moons_config(config)
  train_set, test_set = two_moons.load_data(moons)
  state = two_moons.create_state(moons)
  fit_config = jaxtrain.FitConfig(epochs=config.epochs, batch_size=config.batch_size,
                                  seed=config.seed, profile_steps=config.profile_steps)
  record = {"experiment": "mc_dropout", "config": _cli.to_record(config),
            "fit": dataclasses.asdict(fit_config)}
  result = run(state, train_set, config=fit_config, workdir=config.workdir, record=record,
               val=test_set, test=test_set, overwrite=config.overwrite, track=config.track,
               checkpoint=config.checkpoint, build=_cli.builder(globals(), "state_from_record"))
  if result.test is None:  # a signal stopped the run (it said so): a rerun resumes it
    return
  mc_key = jaxtrain.key_for(jax.random.key(config.seed), "mc_dropout")
  gx, gy, points = plane(train_set["inputs"], config.grid)
  grid = jaxtrain.predict(result.state, points, key=mc_key, mc_samples=config.mc_samples,
                          transform=jax.nn.softmax)
  mean, variance = np.asarray(grid.mean[:, 1]), np.asarray(grid.variance[:, 1])
  held = jaxtrain.predict(result.state, test_set["inputs"], key=mc_key,
                          mc_samples=config.mc_samples, transform=jax.nn.softmax)
  mc_accuracy = float(np.mean(np.argmax(held.mean, 1) == test_set["targets"]))
  path = config.workdir / "uncertainty.png"
  if jaxtrain.engine.distributed.is_primary():
    plot(path, gx, gy, mean, variance, train_set)
    log_images(config.workdir, {"uncertainty": path})  # TensorBoard, the trackers
  print(f"held-out accuracy {result.test['accuracy']:.4f} (dropout off), "
        f"{mc_accuracy:.4f} (mean of {config.mc_samples} MC dropout samples); predictive "
        f"variance of p(class 1) over the plane: median {np.median(variance):.4f}, "
        f"max {variance.max():.4f}  ->  {path}")


if __name__ == "__main__":
  _cli.command(Config, main)
