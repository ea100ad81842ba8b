"""MNIST digits with a small CNN: the template for a realistic training job.

    uv run python -m experiments.mnist_cnn --data-dir ../shared/data/mnist
    uv run python -m experiments.mnist_cnn --data-dir ../shared/data/mnist --epochs 20 \\
        --workdir runs/mnist_cnn_long

Ten classes; a seeded 10% of the training images validate every epoch and the
official test set (t10k) is evaluated once at the end. Pixels are scaled to
[0, 1]; training images are shifted at random by up to ``--shift`` pixels (a
key per step and image, so the run is a function of its seed). Conv blocks with
batch norm, dropout, cross-entropy, AdamW with a linear warmup and a cosine
decay of the learning rate over ``--epochs`` (so a larger ``--epochs`` on a
finished run continues on the longer schedule), gradient clipping; full batches
only; data-parallel over all local devices by default, with cross-replica batch
norm. Without an IDX folder in ``--data-dir`` the images come from
tensorflow-datasets (``--dataset``, prepared as array_record in ``--data-dir`` or
tfds's default data dir). ``--data stream`` reads each step's images by index
while the device trains (from tfds's array_record files, decoded on demand), for
datasets bigger than memory; the run is the same, bit for bit.

    uv run python -m experiments.mnist_cnn --dataset fashion_mnist \\
        --data-dir ~/tensorflow_datasets --data stream
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import jaxtrain
from experiments import _cli, _sweep
from jaxtrain import data, losses, models, parallel
from jaxtrain.core.optim import OptimizerConfig, no_bias_norm_mask
from jaxtrain.core.regularize import Regularization
from jaxtrain.engine.distributed import DistributedConfig
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.rundir.run import run


@dataclasses.dataclass(frozen=True)
class Config:
  """MNIST: a CNN with batch norm and dropout trained with AdamW."""

  workdir: pathlib.Path = pathlib.Path("runs/mnist_cnn")  # Run directory.
  seed: int = 0  # Seeds the validation split, init, shuffling, dropout, augmentation.
  data_dir: pathlib.Path | None = None  # IDX folder, or a tfds data dir; default: tfds's own.
  # A tensorflow-datasets image dataset, prepared as array_record (an IDX folder
  # in --data-dir is read instead when it holds one).
  dataset: Literal["mnist", "fashion_mnist", "cifar10"] = _cli.added_flag("mnist")
  # Where the images live while training: resident on the device, or streamed
  # (read by index step by step, tfds's files on demand); auto: by size.
  data: Literal["auto", "device", "stream"] = _cli.added_flag("auto")
  val_fraction: float = 0.1  # Share of the training images held out for validation.
  limit: int = 0  # Use only the first N training and N test images (0: all; quick checks).
  # The CNN's Flax API: Linen, or the same network in NNX (jaxtrain.nn.nnx_models),
  # started from the same initial variables.
  api: Literal["linen", "nnx"] = _cli.added_flag("linen")
  features: tuple[int, ...] = (32, 64)  # Channels of each conv block.
  dense: int = 128  # Width of the hidden dense layer (0: none).
  dropout: float = 0.25  # Dropout rate before the dense layer and the head.
  shift: int = 2  # Random shifts of up to this many pixels (0: no augmentation).
  epochs: int = 8  # Passes over the training set.
  batch_size: int = 128  # Global mini-batch size (divisible by the devices).
  # Micro-batches of --batch-size per optimizer update (gradient accumulation).
  accumulate_steps: int = _cli.added_flag(1)
  # The optimizer (its flags take no "optim." prefix; the learning rate is the peak,
  # after the warmup); weight decay skips biases and batch-norm parameters.
  optim: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = OptimizerConfig(
      "adamw", learning_rate=3e-3, weight_decay=0.01, clip_norm=1.0)
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
  warmup_epochs: float = 1.0  # Linear warmup from 0, then cosine decay to 0.
  devices: int = 0  # Data-parallel devices (0: all devices of every process).
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
  """Train, validation (a seeded ``val_fraction`` of train) and test sets in
  [0, 1]: arrays, or with ``--data stream`` and a tfds dataset, sources that
  read (and decode and scale) images only when a step needs them."""
  if config.limit < 0:
    raise ValueError(f"--limit must be >= 0, got {config.limit}")
  if not 0.0 < config.val_fraction < 1.0:
    raise ValueError(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
  idx = data.mnist.has_idx_files(config.data_dir)
  if config.data_dir is not None and not idx:
    if not config.data_dir.is_dir():
      raise ValueError(f"--data-dir {str(config.data_dir)!r}: not an existing directory")
    if not (config.data_dir / config.dataset).is_dir():
      wanted = ", ".join(f"{f}[.gz]" for pair in data.IDX_FILES.values() for f in pair)
      raise ValueError(f"--data-dir {config.data_dir} holds neither MNIST IDX files (looked "
                       f"for {wanted}) nor a prepared tensorflow-datasets {config.dataset!r} "
                       "folder")
  if idx:
    parts = data.load_mnist(config.data_dir, arg="--data-dir")
  elif config.data == "stream":
    parts = {s: data.tfds_source(config.dataset, s, data_dir=config.data_dir)
             for s in ("train", "test")}
  else:
    parts = data.load_tfds(config.dataset, data_dir=config.data_dir)
  if config.limit:
    parts = {k: data.take(v, 0, min(config.limit, data.length(v))) for k, v in parts.items()}
  def scale(rows):
    return {**rows, "inputs": data.normalize_images(rows["inputs"])}
  parts = {k: v.map(scale) if isinstance(v, data.Source) else scale(v) for k, v in parts.items()}
  data_key = jaxtrain.key_for(jax.random.key(config.seed), "data")
  train, val = data.split(parts["train"], data_key,
                          (1 - config.val_fraction, config.val_fraction))
  return train, val, parts["test"]


def make_augment(shift: int):
  """``augment(key, image) -> image``: a random shift by up to ``shift`` pixels.

  The image is zero-padded by ``shift`` on each side and a window of its own size
  is cut at offsets drawn from ``key``: pure jax, vmapped over the batch by fit.
  """
  def augment(key, image):
    padded = jnp.pad(image, ((shift, shift), (shift, shift), (0, 0)))
    dy, dx = jax.random.randint(key, (2,), 0, 2 * shift + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)

  return augment


def num_devices(config: Config) -> int:
  if config.devices < 0:
    raise ValueError(f"--devices must be >= 0, got {config.devices}")
  return config.devices or jax.device_count()


def make_schedule(config: Config, num_train: int) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_epochs``, then cosine decay to 0 at the end."""
  if not 0 <= config.warmup_epochs < float("inf"):
    raise ValueError(f"--warmup-epochs must be a finite number >= 0, got {config.warmup_epochs}")
  if config.batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
  if num_train < config.batch_size:
    raise ValueError(f"--batch-size {config.batch_size} exceeds the {num_train} training images")
  steps_per_epoch = data.num_batches(num_train, config.batch_size, drop_remainder=True)
  total_steps = max(config.epochs, 1) * steps_per_epoch
  warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.learning_rate, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=0.0)


def create_state(config: Config, num_train: int) -> jaxtrain.TrainState:
  """The CNN and its optimizer, initialised from the config's seed; the
  learning-rate schedule depends on the number of training images."""
  tx = config.optim.make(make_schedule(config, num_train), weight_decay_mask=no_bias_norm_mask)
  # On several devices batch norm averages its statistics over the devices' shards.
  model = models.CNN(features=config.features, dense=config.dense, outputs=10,
                     dropout_rate=config.dropout,
                     axis_name=parallel.AXIS if num_devices(config) > 1 else None)
  shape = data.TFDS_IMAGE_SHAPES[config.dataset]
  create = functools.partial(
      jaxtrain.create_train_state, tx=tx, key=jax.random.key(config.seed),
      example_inputs=np.zeros((1, *shape), np.float32), loss_fn=losses.cross_entropy,
      regularization=config.reg, ema_decay=config.ema, precision=config.precision)
  state = create(model)
  if config.api == "nnx":  # the same network in NNX, holding the Linen one's initial variables
    from jaxtrain.nn import nnx_models

    state = create(nnx_models.cnn_from_linen(shape, model, state.variables))
  return state


def config_from_record(record: dict) -> Config:
  """The Config a run's config.json holds."""
  return _cli.from_record(Config, record["config"])


def state_from_record(record: dict) -> jaxtrain.TrainState:
  """The state a run's config.json describes (``checkpoint.load`` calls it);
  the number of training images comes from the record, not the data."""
  return create_state(config_from_record(record), record["sizes"]["train"])


def main(config: Config) -> None:
  if config.sweep != _sweep.SweepConfig():
    return _sweep.run(config, main, vmapped=("weight_decay", "seed"))
  if config.shift < 0:
    raise ValueError(f"--shift must be >= 0, got {config.shift}")
  if not config.features:  # "--features" alone: no conv block, not a CNN at all
    raise ValueError("--features needs the channels of at least one conv block "
                     "(e.g. --features 32 64), got none")
  devices = num_devices(config)
  train_set, val_set, test_set = load_data(config)
  sizes = {"train": data.length(train_set), "val": data.length(val_set),
           "test": data.length(test_set)}
  state = create_state(config, sizes["train"])
  # drop_remainder: full batches only. Batch norm should not train on a ragged
  # last batch, and on several devices flax's masked BatchNorm averages the
  # per-device means, so a device whose shard is all padding gives NaN statistics.
  fit_config = jaxtrain.FitConfig(epochs=config.epochs, batch_size=config.batch_size,
                                  seed=config.seed, devices=devices, drop_remainder=True,
                                  accumulate_steps=config.accumulate_steps, data=config.data,
                                  profile_steps=config.profile_steps)
  record = {"experiment": "mnist_cnn", "config": _cli.to_record(config),
            "fit": dataclasses.asdict(fit_config),
            "sizes": sizes}
  augment = make_augment(config.shift) if config.shift else None
  result = run(state, train_set, config=fit_config, workdir=config.workdir, record=record,
               val=val_set, test=test_set, augment=augment, overwrite=config.overwrite, track=config.track,
               checkpoint=config.checkpoint, build=_cli.builder(globals(), "state_from_record"))
  if result.test is not None:  # None when a signal stopped the run (it said so)
    ema = (f"  (EMA of the parameters: accuracy {result.test['ema_accuracy']:.4f}  loss "
           f"{result.test['ema_loss']:.4f})" if "ema_accuracy" in result.test else "")
    print(f"test accuracy {result.test['accuracy']:.4f}  loss {result.test['loss']:.4f}{ema}"
          f"  ({sizes['test']} images)  ->  {config.workdir}")


if __name__ == "__main__":
  _cli.command(Config, main)
