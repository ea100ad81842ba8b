"""Small builders shared by tests."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxtrain
from jaxtrain import losses, models


def make_state(model=None, *, optimizer=("sgd", 0.1), inputs_shape=(1, 6),
               loss_fn=losses.cross_entropy, seed=0, **opt_kwargs):
  model = model or models.MLP(hidden_sizes=(8,), outputs=3)
  tx = jaxtrain.make_optimizer(*optimizer, **opt_kwargs)
  return jaxtrain.create_train_state(
      model, tx, jax.random.key(seed), jnp.zeros(inputs_shape), loss_fn=loss_fn
  )


def classification_batch(n=8, features=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "inputs": rng.normal(size=(n, features)).astype(np.float32),
      "targets": rng.integers(0, classes, size=(n,)).astype(np.int32),
  }


def tree_equal(a, b) -> bool:
  """Bitwise equality of two pytrees of arrays."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype
      and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
  )


def tree_allclose(a, b, **kw) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.allclose(np.asarray(x), np.asarray(y), **kw) for x, y in zip(la, lb)
  )


# Columns that time the run: they differ between two runs of the same numbers.
TIMED = ("seconds", "examples_per_second", "flops_per_second", "peak_fraction")


def untimed_rows(path) -> list[list[str]]:
  """A metrics CSV's cells without its timing columns: ``path`` is the file,
  or a run directory (its metrics.csv)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.csv"
  lines = path.read_text().splitlines()
  keep = [i for i, c in enumerate(lines[0].split(",")) if c not in TIMED]
  return [[line.split(",")[i] for i in keep] for line in lines]


def moons_split(n_samples=200, n_train=160):
  """Two moons (seed 0, noise 0.2) as float32/int32 train and validation dicts."""
  x, y = jaxtrain.datasets.two_moons(jax.random.key(0), n_samples=n_samples, noise=0.2)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  return ({"inputs": x[:n_train], "targets": y[:n_train]},
          {"inputs": x[n_train:], "targets": y[n_train:]})
