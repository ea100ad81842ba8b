"""Two moons with a 2-16-2 MLP: the main job, on built-in data.

    uv run python -m experiments.two_moons
    uv run python -m experiments.two_moons --full-batch --workdir runs/moons_gd

1000 points of scikit-learn's two-moons geometry (noise 0.2), standardised, split
80/20 into training and held-out sets; cross-entropy, SGD (lr 0.1, momentum
0.9), batches of 32, 100 epochs. ``--full-batch`` also trains the same model by
full-batch gradient descent and plots both runs in curves.png.
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
from jaxtrain.engine.distributed import DistributedConfig
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.rundir.run import check_workdir, run, stop_on_signals


@dataclasses.dataclass(frozen=True)
class Config:
  """Two moons: an MLP classifier trained with mini-batch SGD."""

  workdir: pathlib.Path = pathlib.Path("runs/two_moons")  # Run directory.
  seed: int = 0  # Seeds data, initialisation, shuffling and dropout.
  samples: int = 1000  # Points drawn.
  noise: float = 0.2  # Standard deviation of the Gaussian noise.
  test_fraction: float = 0.2  # Held-out share, evaluated every epoch.
  hidden: tuple[int, ...] = (16,)  # Hidden layer widths.
  dropout: float = 0.0  # Dropout rate after each hidden layer.
  epochs: int = 100  # Passes over the training set.
  batch_size: int = 32  # Mini-batch size.
  # Micro-batches of --batch-size per optimizer update (gradient accumulation).
  accumulate_steps: int = _cli.added_flag(1)
  # The optimizer (its flags take no "optim." prefix).
  optim: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = OptimizerConfig(
      "sgd", learning_rate=0.1, momentum=0.9)
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
  full_batch: bool = False  # Also train by full-batch gradient descent; plot both.
  seeds: int = 1  # Train seeds seed..seed+N-1 in one vmapped program; report mean and spread.
  devices: int = 1  # Data-parallel devices.
  # Where the points live while training: resident on the device, or streamed
  # (read on the host step by step; the same run, bit for bit); auto: by size.
  data: Literal["auto", "device", "stream"] = _cli.added_flag("auto")
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
  """Standardised 80/20 split of the two moons drawn from the seed."""
  if not 0.0 < config.test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {config.test_fraction}")
  data_key = jaxtrain.key_for(jax.random.key(config.seed), "data")
  x, y = data.two_moons(data_key, n_samples=config.samples, noise=config.noise)
  train, test = data.split({"inputs": x, "targets": y}, data_key,
                           fractions=(1 - config.test_fraction, config.test_fraction))
  train_x, test_x = data.standardize(train["inputs"], test["inputs"])
  return {**train, "inputs": train_x}, {**test, "inputs": test_x}


def create_states(config: Config, seeds) -> list[jaxtrain.TrainState]:
  """States of one model and optimizer (built once), initialised from each seed."""
  tx = config.optim.make()
  model = models.MLP(hidden_sizes=config.hidden, outputs=2, dropout_rate=config.dropout)
  return [jaxtrain.create_train_state(model, tx, jax.random.key(seed), jnp.zeros((1, 2)),
                                      loss_fn=losses.cross_entropy,
                                      regularization=config.reg, ema_decay=config.ema,
                                      precision=config.precision)
          for seed in seeds]


def create_state(config: Config) -> jaxtrain.TrainState:
  """The model and optimizer of a config, initialised from its seed."""
  return create_states(config, [config.seed])[0]


def config_from_record(record: dict) -> Config:
  """The Config a run's config.json holds."""
  return _cli.from_record(Config, record["config"])


def state_from_record(record: dict) -> jaxtrain.TrainState:
  """The state a run's config.json describes (``checkpoint.load`` calls it)."""
  return create_state(config_from_record(record))


def train(config: Config, *, batch_size: int, workdir: pathlib.Path, extra=None):
  train_set, test_set = load_data(config)
  state = create_state(config)
  fit_config = jaxtrain.FitConfig(epochs=config.epochs, batch_size=batch_size,
                                  seed=config.seed, devices=config.devices,
                                  accumulate_steps=config.accumulate_steps, data=config.data,
                                  profile_steps=config.profile_steps)
  record = {"experiment": "two_moons", "config": _cli.to_record(config),
            "fit": dataclasses.asdict(fit_config)}
  return run(state, train_set, config=fit_config, workdir=workdir, record=record,
             val=test_set, test=test_set, overwrite=config.overwrite, track=config.track,
             checkpoint=config.checkpoint, extra_curves=extra,
             build=_cli.builder(globals(), "state_from_record"))


def train_seeds(config: Config) -> None:
  """``--seeds N``: N runs in one compiled program, summarised in seeds.csv."""
  from jaxtrain.train import many

  if config.seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {config.seeds}")
  if config.seed + config.seeds > _cli.SEED_LIMIT:
    raise ValueError(f"--seeds {config.seeds} from --seed {config.seed} passes the largest "
                     f"seed, {_cli.SEED_LIMIT - 1}")
  if config.full_batch:
    raise ValueError("--seeds and --full-batch cannot be combined")
  if config.track:  # one program, no run directory per seed: nothing to track into
    raise ValueError(f"--seeds {config.seeds} writes seeds.csv, not a run per seed: "
                     f"--track {config.track} cannot be combined with it (--sweep's "
                     "members are runs, and are tracked)")
  if config.data == "stream":
    raise ValueError("--seeds trains every seed in one program on resident data: "
                     "--data stream cannot be combined with it")
  seeds = list(range(config.seed, config.seed + config.seeds))
  configs = [dataclasses.replace(config, seed=s) for s in seeds]
  splits = [load_data(c) for c in configs]
  train_set = many.stack([s[0] for s in splits])
  test_set = many.stack([s[1] for s in splits])
  fit_config = jaxtrain.FitConfig(epochs=config.epochs, batch_size=config.batch_size,
                                  accumulate_steps=config.accumulate_steps)
  check_workdir(config.workdir, None, overwrite=config.overwrite)
  with stop_on_signals() as should_stop:
    result = many.fit_many(many.stack(create_states(config, seeds)), train_set,
                           val=test_set, test=test_set, seeds=seeds, member_data=True,
                           config=fit_config, should_stop=should_stop)
  if result is None:
    print(f"{should_stop() or 'a signal'}: stopped; --seeds keeps no checkpoint, nothing was "
          "written: run the same command to train the seeds again")
    return
  accuracy = np.asarray([t["accuracy"] for t in result.test])
  config.workdir.mkdir(parents=True, exist_ok=True)
  with open(config.workdir / "seeds.csv", "w") as f:
    f.write("seed,test_loss,test_accuracy\n")
    for seed, t in zip(seeds, result.test):
      f.write(f"{seed},{t['loss']!r},{t['accuracy']!r}\n")
  print(f"{config.seeds} seeds: held-out accuracy mean {accuracy.mean():.4f}  std "
        f"{accuracy.std(ddof=1) if len(accuracy) > 1 else 0.0:.4f}  min {accuracy.min():.4f}"
        f"  max {accuracy.max():.4f}  ->  {config.workdir / 'seeds.csv'}")


def main(config: Config) -> None:
  if config.sweep != _sweep.SweepConfig():
    return _sweep.run(config, main, vmapped=("learning_rate", "weight_decay", "seed"))
  if config.seeds != 1:
    return train_seeds(config)
  extra = None
  if config.full_batch:
    n_train = round(config.samples * (1 - config.test_fraction))
    gd = train(config, batch_size=n_train, workdir=config.workdir / "full_batch")
    if gd.test is None:  # a signal stopped it (it said so): the rerun resumes it
      return
    extra = {"full batch": gd.history}
    print(f"full-batch GD: held-out accuracy {gd.test['accuracy']:.4f}")
  result = train(config, batch_size=config.batch_size, workdir=config.workdir, extra=extra)
  if result.test is not None:
    print(f"held-out accuracy {result.test['accuracy']:.4f}  loss {result.test['loss']:.4f}"
          f"  ->  {config.workdir}")


if __name__ == "__main__":
  _cli.command(Config, main)
