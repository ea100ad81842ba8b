"""Data sources: numpy arrays in, :class:`Dataset` out.

Every source gives splits as ``{"inputs": np.ndarray, "targets": int32 array}``
dicts: the synthetic :func:`two_moons`, a local MNIST IDX folder or
tensorflow-datasets (:mod:`jaxtrain.data.mnist`, :mod:`jaxtrain.data.tfds`),
plus the splitting and scaling the experiments use. :func:`load` gives any of
them as a :class:`Dataset` in one call. Randomness comes only from explicit JAX
keys (their bits seed a numpy ``Generator``, so no shape ever triggers an XLA
compile); bad input raises :class:`DataError` naming the offending file or
argument and its value.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxtrain.core.keys import as_key
from jaxtrain.data import mnist, tfds
from jaxtrain.data.arrays import Arrays, DataError, check_length
from jaxtrain.data.indexed import Source

#: name -> number of classes, for every name :func:`load` accepts.
NUM_CLASSES = {"two_moons": 2, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}
#: Fractions of :func:`split` for a dataset without its own val/test splits.
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """The splits of one dataset.

  Attributes:
    train: ``{"inputs": x, "targets": y}`` numpy arrays, equal leading axes.
    val: same layout, or None when the dataset has no validation split.
    test: same layout, or None when the dataset has no test split.
    num_classes: number of classes; targets lie in ``[0, num_classes)``.
    name: the registry name, e.g. ``"mnist"``.
    source: where the arrays came from, e.g. ``"idx:/data/mnist"``.

  >>> ds = load("two_moons", key=jax.random.key(0), n_samples=100)
  >>> ds.train["inputs"].shape, ds.val["targets"].shape, ds.num_classes
  ((60, 2), (20,), 2)
  """

  train: Arrays
  val: Arrays | None
  test: Arrays | None
  num_classes: int
  name: str = ""
  source: str = ""

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one input, e.g. ``(28, 28, 1)``."""
    return tuple(self.train["inputs"].shape[1:])


def _key(key, where: str) -> jax.Array:
  try:
    return as_key(key)
  except (ValueError, TypeError) as e:
    raise DataError(f"{where}: key must be a jax.random key, got {key!r:.60}") from e


def _rng(key, where: str) -> np.random.Generator:
  """A numpy generator seeded by the key's bits (no per-shape XLA compile)."""
  words = np.asarray(jax.random.key_data(_key(key, where))).ravel()
  return np.random.default_rng([int(w) for w in words])


def two_moons(key, n_samples: int = 1000, noise: float = 0.2):
  """Two interleaving half circles, as scikit-learn's ``make_moons``.

  Class 0 is the outer moon ``(cos t, sin t)`` (``n_samples // 2`` points),
  class 1 the inner moon ``(1 - cos t, 1 - sin t - 0.5)``, ``t = linspace(0, pi,
  m)``; rows shuffled by ``key`` (a ``jax.random.key`` or legacy ``PRNGKey``)
  plus gaussian noise of standard deviation ``noise`` (>= 0). Same key, same
  arrays. Returns float32 ``x [n_samples, 2]`` and int32 ``y [n_samples]``.

  >>> x, y = two_moons(jax.random.key(0), n_samples=6, noise=0.0)
  >>> x.shape, x.dtype, sorted(y.tolist())
  ((6, 2), dtype('float32'), [0, 0, 0, 1, 1, 1])
  """
  rng = _rng(key, "two_moons")
  if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 2:
    raise DataError(f"two_moons: n_samples must be an integer >= 2, got {n_samples!r}")
  if not (isinstance(noise, int | float | np.floating) and math.isfinite(noise) and noise >= 0):
    raise DataError(f"two_moons: noise must be a finite number >= 0, got {noise!r}")
  n_out = int(n_samples) // 2
  t_out = np.linspace(0.0, np.pi, n_out)
  t_in = np.linspace(0.0, np.pi, int(n_samples) - n_out)
  x = np.concatenate([
      np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
      np.stack([1.0 - np.cos(t_in), 1.0 - np.sin(t_in) - 0.5], axis=1),
  ])
  y = np.concatenate([np.zeros(n_out, np.int32), np.ones(len(t_in), np.int32)])
  order, eps = rng.permutation(len(y)), rng.standard_normal(x.shape)
  return (x[order] + noise * eps).astype(np.float32), y[order]


def split(arrays: Mapping[str, np.ndarray], key,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[Arrays, ...]:
  """Splits rows into disjoint parts at random, the permutation drawn from ``key``.

  Part boundaries are ``round(n * cumsum(fractions))``, so sizes add up to ``n``.

  Args:
    arrays: dict of arrays with a shared leading axis, or a
      :class:`~jaxtrain.data.Source` (then the parts are views on its rows).
    key: a ``jax.random.key`` or legacy ``PRNGKey``; same key, same split.
    fractions: positive fractions summing to 1 (default 60/20/20).

  Returns:
    One dict per fraction, with the keys of ``arrays``.

  >>> data = {"inputs": np.arange(10.0)[:, None], "targets": np.arange(10)}
  >>> [len(p["targets"]) for p in split(data, jax.random.key(0))]
  [6, 2, 2]
  """
  n = len(arrays) if isinstance(arrays, Source) else check_length(arrays, "split", DataError)
  rng = _rng(key, "split")
  fractions = tuple(fractions)
  if not fractions or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
    raise DataError(f"split: fractions must be positive and sum to 1, got {fractions}")
  bounds = [0, *np.round(np.cumsum(fractions)[:-1] * n).astype(int).tolist(), n]
  if any(a >= b for a, b in zip(bounds, bounds[1:])):
    raise DataError(f"split: fractions {fractions} leave an empty part of n={n} rows")
  order = rng.permutation(n)
  if isinstance(arrays, Source):  # views on the same rows, read when needed
    return tuple(arrays.subset(order[a:b]) for a, b in zip(bounds, bounds[1:]))
  return tuple({k: np.asarray(v)[order[a:b]] for k, v in arrays.items()}
               for a, b in zip(bounds, bounds[1:]))


def take(arrays: Mapping[str, np.ndarray], start: int, stop: int) -> Arrays:
  """Rows ``start:stop`` of every array, or of a source (deterministic, no key).

  >>> take({"targets": np.arange(5)}, 1, 3)["targets"].tolist()
  [1, 2]
  """
  n = len(arrays) if isinstance(arrays, Source) else check_length(arrays, "take", DataError)
  if not (isinstance(start, int | np.integer) and isinstance(stop, int | np.integer)
          and 0 <= start <= stop <= n):
    raise DataError(f"take: need 0 <= start <= stop <= {n}, got start={start!r} stop={stop!r}")
  if isinstance(arrays, Source):
    return arrays.subset(np.arange(start, stop))
  return {k: np.asarray(v)[start:stop] for k, v in arrays.items()}


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """Standardizes per feature (axis 0) with the mean and std of ``train`` only.

  Features whose train std is 0 are only centred. Returns ``(train, *others)``
  standardized, as float32; ``others`` (e.g. val, test) share train's trailing shape.

  >>> tr, te = standardize(np.array([[0.0], [2.0]]), np.array([[4.0]]))
  >>> tr.ravel().tolist(), te.ravel().tolist()
  ([-1.0, 1.0], [3.0])
  """
  train = np.asarray(train)
  if train.ndim < 1 or len(train) == 0:
    raise DataError(f"standardize: train must have at least one row, got shape {train.shape}")
  for i, x in enumerate(others):
    if np.shape(x)[1:] != train.shape[1:]:
      raise DataError(f"standardize: others[{i}] has shape {np.shape(x)}, "
                      f"expected [*, {', '.join(map(str, train.shape[1:]))}]")
  mean = train.mean(axis=0, dtype=np.float64)
  std = train.std(axis=0, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)
  return tuple(((np.asarray(x) - mean) / std).astype(np.float32) for x in (train, *others))


def normalize_images(x: np.ndarray, mean=0.0, std=1.0) -> np.ndarray:
  """uint8 images to float32: ``(x / 255 - mean) / std``; defaults give ``[0, 1]``.

  ``mean`` and ``std`` broadcast against the trailing (channel) axis.

  >>> normalize_images(np.array([0, 51, 255], np.uint8)).tolist()
  [0.0, 0.2, 1.0]
  """
  x = np.asarray(x)
  if x.dtype != np.uint8:
    raise DataError(f"normalize_images: x must be uint8, got dtype {x.dtype}")
  std = np.asarray(std, np.float32)
  if not np.all(std > 0):
    raise DataError(f"normalize_images: std must be > 0, got {std.tolist()}")
  return ((x.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / std).astype(np.float32)


def load(name: str, *, key, data_dir=None, val_fraction: float = 0.1,
         normalize: bool = True, n_samples: int = 1000, noise: float = 0.2) -> Dataset:
  """Loads a dataset by name into a :class:`Dataset`; the entry point for experiments.

  * ``"two_moons"``: :func:`two_moons` (``n_samples``, ``noise``) split
    60/20/20 into train/val/test; inputs float32 ``[n, 2]``.
  * ``"mnist"``, ``"fashion_mnist"``: an IDX folder when ``data_dir`` holds
    ``*-idx?-ubyte*`` files (:func:`jaxtrain.data.load_mnist`), else tensorflow-datasets
    (:func:`jaxtrain.data.load_tfds`, which needs the dataset prepared as array_record).
  * ``"cifar10"``: tensorflow-datasets.

  Image inputs are ``[n, H, W, C]`` (MNIST-like: ``[n, 28, 28, 1]``), float32 in
  ``[0, 1]`` when ``normalize`` else uint8. The official test split is ``test``
  and ``val`` is a ``val_fraction`` of train drawn with ``key`` (None when 0).

  Args:
    name: one of ``NUM_CLASSES``.
    key: a ``jax.random.key`` or legacy ``PRNGKey`` for generation and splits.
    data_dir: IDX folder or tfds data dir; None uses tfds's default.
    val_fraction: fraction of train held out for validation (image sets).
    normalize: convert images to float32 in ``[0, 1]``.
    n_samples, noise: two_moons only, see :func:`two_moons`.

  >>> ds = load("two_moons", key=jax.random.key(0))
  >>> ds.train["inputs"].shape, ds.test["inputs"].dtype, ds.source
  ((600, 2), dtype('float32'), 'synthetic')
  """
  if name not in NUM_CLASSES:
    raise DataError(f"load: unknown dataset name {name!r}; supported: {', '.join(NUM_CLASSES)}")
  key = _key(key, "load")
  if name == "two_moons":
    x, y = two_moons(jax.random.fold_in(key, 0), n_samples, noise)
    train, val, test = split({"inputs": x, "targets": y}, jax.random.fold_in(key, 1))
    return Dataset(train, val, test, NUM_CLASSES[name], name, "synthetic")
  if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
    raise DataError(f"load: val_fraction must be in [0, 1), got {val_fraction!r}")
  if (name in ("mnist", "fashion_mnist") and data_dir is not None
      and not mnist.has_idx_files(data_dir) and not (pathlib.Path(data_dir) / name).is_dir()):
    wanted = ", ".join(f"{f}[.gz]" for pair in mnist.IDX_FILES.values() for f in pair)
    raise DataError(f"load: {data_dir} holds neither MNIST IDX files (looked for {wanted}) "
                    f"nor a prepared tensorflow-datasets {name!r} folder")
  if name in ("mnist", "fashion_mnist") and mnist.has_idx_files(data_dir):
    parts, source = mnist.load_mnist(data_dir), f"idx:{data_dir}"
  else:
    parts, source = tfds.load_tfds(name, data_dir=data_dir), f"tfds:{data_dir or 'default'}"
  if normalize:
    parts = {k: {**v, "inputs": normalize_images(v["inputs"])} for k, v in parts.items()}
  train, val = parts["train"], None
  if val_fraction > 0:
    train, val = split(train, jax.random.fold_in(key, 1), (1 - val_fraction, val_fraction))
  return Dataset(train, val, parts["test"], NUM_CLASSES[name], name, source)
