"""The lessons' "pigeon": is an MNIST digit smaller than 3? A 784-30-1 MLP.

    uv run python -m experiments.mnist_pigeon --data-dir ../shared/data/mnist
    uv run python -m experiments.mnist_pigeon --data-dir ../shared/data/mnist --hidden 60 \\
        --workdir runs/pigeon_60
    uv run python -m experiments.mnist_pigeon --data-dir ../shared/data/mnist \\
        --eval-every-steps 1 --workdir runs/pigeon_curves   # per-iteration accuracies

The first 1024 MNIST training images train, the next 1024 validate; pixels are
scaled to [0, 1] and flattened (torchvision's ``ToTensor``), the target is the
int32 0/1 "digit < 3". One ReLU hidden layer, one logit, BCE with logits, SGD
(lr 0.005, momentum 0.9), batches of 32, 15 epochs. Weights are initialised as
PyTorch's ``nn.Linear`` does (the lesson was PyTorch); ``--init flax`` gives
flax's lecun-normal kernels and zero biases instead. ``train_accuracy`` in
metrics.csv is the whole training set evaluated at the end of each epoch; with
``--eval-every-steps N`` steps.jsonl also holds train/val accuracy every N
steps (the lesson's per-iteration curves). Without ``--data-dir`` MNIST comes
from tensorflow-datasets (prepared as array_record in its default data dir).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated, Literal

import jax
import numpy as np
import tyro

import jaxtrain
from experiments import _cli, _sweep
from jaxtrain import data, losses, models
from jaxtrain.core.optim import OptimizerConfig
from jaxtrain.core.regularize import Regularization
from jaxtrain.engine.distributed import DistributedConfig
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.rundir.run import run


@dataclasses.dataclass(frozen=True)
class Config:
  """MNIST "digit < 3" with a one-hidden-layer MLP trained by SGD."""

  workdir: pathlib.Path = pathlib.Path("runs/mnist_pigeon")  # Run directory.
  seed: int = 0  # Seeds initialisation, shuffling and dropout.
  data_dir: pathlib.Path | None = None  # MNIST IDX folder; default: tensorflow-datasets.
  train_size: int = 1024  # Training images: the first N of the training files.
  val_size: int = 1024  # Validation images: the N after the training ones.
  hidden: int = 30  # Hidden layer width (the lesson compares 15, 30 and 60).
  init: Literal["torch", "flax"] = "torch"  # Weight init: nn.Linear's uniform, or flax's.
  dropout: float = 0.0  # Dropout rate after the hidden layer.
  epochs: int = 15  # Passes over the training set.
  batch_size: int = 32  # Mini-batch size.
  # Micro-batches of --batch-size per optimizer update (gradient accumulation).
  accumulate_steps: int = _cli.added_flag(1)
  # The optimizer (its flags take no "optim." prefix).
  optim: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = OptimizerConfig(
      "sgd", learning_rate=0.005, momentum=0.9)
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
  eval_every_steps: int = 0  # Also evaluate train and val every N steps (0: per epoch).
  devices: int = 1  # Data-parallel devices.
  overwrite: bool = False  # Replace a different run already in --workdir.
  # Experiment trackers to log to as well: mlflow, wandb, trackio (comma-separated).
  track: str | None = _cli.added_flag(None)
  # A grid or random search over the flags, one sub-run per member in <workdir>/members.
  sweep: Annotated[_sweep.SweepConfig, tyro.conf.OmitArgPrefixes] = _cli.added_flag(
      _sweep.SweepConfig())
  checkpoint: CheckpointConfig = CheckpointConfig()  # When to save; a rerun resumes.
  # Join a multi-process run (jax.distributed); unset: one process.
  distributed: DistributedConfig = DistributedConfig()


def load_data(config: Config):
  """The first ``train_size`` images and the ``val_size`` after them, as 0/1 targets."""
  for name in ("train_size", "val_size"):
    if getattr(config, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
  mnist = data.load_mnist(config.data_dir, splits=("train",), arg="--data-dir")["train"]
  n = len(mnist["targets"])
  if config.train_size + config.val_size > n:
    raise ValueError(f"--train-size {config.train_size} + --val-size {config.val_size} "
                     f"exceed the {n} MNIST training images")
  images = data.normalize_images(mnist["inputs"]).reshape(n, -1)
  arrays = {"inputs": images, "targets": (mnist["targets"] < 3).astype(np.int32)}
  train = data.take(arrays, 0, config.train_size)
  val = data.take(arrays, config.train_size, config.train_size + config.val_size)
  return train, val


def create_state(config: Config) -> jaxtrain.TrainState:
  """The pigeon and its optimizer, initialised from the config's seed."""
  tx = config.optim.make()
  model = models.Pigeon(config.hidden, dropout_rate=config.dropout, init_style=config.init)
  return jaxtrain.create_train_state(model, tx, jax.random.key(config.seed),
                                     np.zeros((1, 784), np.float32),
                                     loss_fn=losses.binary_cross_entropy_with_logits,
                                     regularization=config.reg, ema_decay=config.ema,
                                     precision=config.precision)


def config_from_record(record: dict) -> Config:
  """The Config a run's config.json holds."""
  return _cli.from_record(Config, record["config"])


def state_from_record(record: dict) -> jaxtrain.TrainState:
  """The state a run's config.json describes (``checkpoint.load`` calls it)."""
  return create_state(config_from_record(record))


def main(config: Config) -> None:
  if config.sweep != _sweep.SweepConfig():
    return _sweep.run(config, main, vmapped=("learning_rate", "weight_decay", "seed"))
  train_set, val_set = load_data(config)
  state = create_state(config)
  fit_config = jaxtrain.FitConfig(epochs=config.epochs, batch_size=config.batch_size,
                                  seed=config.seed, devices=config.devices,
                                  eval_every_steps=config.eval_every_steps,
                                  accumulate_steps=config.accumulate_steps,
                                  profile_steps=config.profile_steps)
  record = {"experiment": "mnist_pigeon", "config": _cli.to_record(config),
            "fit": dataclasses.asdict(fit_config)}
  result = run(state, train_set, config=fit_config, workdir=config.workdir, record=record,
               val=val_set, overwrite=config.overwrite, track=config.track, checkpoint=config.checkpoint,
               build=_cli.builder(globals(), "state_from_record"))
  interrupted = (result.stop_reason or "").startswith("interrupted")
  if interrupted or not result.history["epoch"].get("epoch"):
    # A signal stopped the run (it said so, maybe before any epoch ended), or it
    # diverged in its first epoch (the command line says so): no epoch to report.
    return
  last = {k: v[-1] for k, v in result.history["epoch"].items()}
  print(f"hidden {config.hidden}: train accuracy {last['train_accuracy']:.4f}  "
        f"validation accuracy {last['val_accuracy']:.4f}  ->  {config.workdir}")


if __name__ == "__main__":
  _cli.command(Config, main)
