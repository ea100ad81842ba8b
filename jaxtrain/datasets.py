"""Data sources behind one small interface: numpy arrays in, :class:`Dataset` out.

Every source gives splits as ``{"inputs": np.ndarray, "targets": int32 array}``
dicts: the synthetic :func:`two_moons`, a local MNIST IDX folder
(:func:`load_mnist_idx`) and tensorflow-datasets (``load_tfds``, from
:mod:`jaxtrain.datasets_tfds`). :func:`load` is the entry point of experiments.
Randomness comes only from explicit JAX keys (their bits seed a numpy
``Generator``, so no shape ever triggers an XLA compile); bad input raises
:class:`DataError` naming the offending file or argument and its value.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import pathlib
import struct
import zlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxtrain.keys import as_key

Arrays = dict[str, np.ndarray]

#: name -> number of classes, for every name :func:`load` accepts.
NUM_CLASSES = {"two_moons": 2, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}
#: Fractions of :func:`split` for a dataset without its own val/test splits.
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
_IDX_TYPE_UBYTE = 0x08


class DataError(ValueError):
  """Bad data or bad arguments; the one-line message names the file or argument."""


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


def read_idx(path, ndim: int | None = None) -> np.ndarray:
  """Reads one unsigned-byte IDX file, gzipped or not, checking it strictly.

  Gzip is recognised by content, not name. ``ndim`` is the required number of
  dimensions (magic ``0x0000080<ndim>``; None accepts 1 to 4). Returns a uint8
  array shaped as the header says; raises :class:`DataError` on an unreadable
  file, corrupted gzip, bad magic, or a payload size the header disagrees with.

  >>> import os, tempfile
  >>> p = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
  >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
  >>> read_idx(p, ndim=1)
  array([7, 8, 9], dtype=uint8)
  """
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: corrupted gzip ({e})") from e
  magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
  dims_ok = range(1, 5) if ndim is None else (ndim,)
  if magic is None or magic >> 8 != _IDX_TYPE_UBYTE or magic & 0xFF not in dims_ok:
    want = "0x0000080[1-4]" if ndim is None else f"0x{(_IDX_TYPE_UBYTE << 8) | ndim:08x}"
    got = "none (file shorter than 4 bytes)" if magic is None else f"0x{magic:08x}"
    raise DataError(f"{path}: bad IDX magic {got}, expected {want}")
  header = 4 + 4 * (magic & 0xFF)
  if len(raw) < header:
    raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
  dims = struct.unpack(f">{magic & 0xFF}I", raw[4:header])
  need, got = math.prod(dims), len(raw) - header
  if got != need:
    what = "truncated payload" if got < need else "trailing bytes after payload"
    raise DataError(f"{path}: {what}: {got} bytes, header dims {list(dims)} need {need}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _find_idx(data_dir: pathlib.Path, name: str) -> pathlib.Path:
  for candidate in (data_dir / name, data_dir / f"{name}.gz"):
    if candidate.is_file():
      return candidate
  raise DataError(f"{data_dir}: missing MNIST file {name} (looked for {name} and {name}.gz)")


def load_mnist_idx(data_dir) -> dict[str, Arrays]:
  """Reads the four MNIST IDX files of a folder (also Fashion-MNIST's).

  Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain
  (torchvision's ``MNIST/raw``) or with ``.gz``; the plain file wins if both exist.

  Returns ``{"train": {"inputs", "targets"}, "test": {...}}``: inputs uint8
  ``[n, rows, cols]`` (``[n, 28, 28]`` for MNIST), targets int32 ``[n]``.
  Raises :class:`DataError` on a missing folder or file, any :func:`read_idx`
  error, labels outside 0..9, or image and label counts that differ.

  >>> load_mnist_idx("/no/such/dir")
  Traceback (most recent call last):
  jaxtrain.datasets.DataError: data_dir /no/such/dir: not an existing directory
  """
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f"data_dir {data_dir}: not an existing directory")
  out = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images_path = _find_idx(data_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(data_dir, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
      raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} "
                      f"holds {len(images)} images")
    if labels.size and labels.max() > 9:
      raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    out[split] = {"inputs": images, "targets": labels.astype(np.int32)}
  return out


def _check_arrays(arrays: Mapping[str, np.ndarray], where: str) -> int:
  if not isinstance(arrays, Mapping) or not arrays:
    raise DataError(f"{where}: arrays must be a non-empty dict of arrays, got {arrays!r:.60}")
  lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
  if None in lengths.values() or len(set(lengths.values())) != 1:
    raise DataError(f"{where}: arrays must share their leading axis, got lengths {lengths}")
  return next(iter(lengths.values()))


def split(arrays: Mapping[str, np.ndarray], key,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[Arrays, ...]:
  """Splits rows into disjoint parts at random, the permutation drawn from ``key``.

  Part boundaries are ``round(n * cumsum(fractions))``, so sizes add up to ``n``.

  Args:
    arrays: dict of arrays with a shared leading axis.
    key: a ``jax.random.key`` or legacy ``PRNGKey``; same key, same split.
    fractions: positive fractions summing to 1 (default 60/20/20).

  Returns:
    One dict per fraction, with the keys of ``arrays``.

  >>> data = {"inputs": np.arange(10.0)[:, None], "targets": np.arange(10)}
  >>> [len(p["targets"]) for p in split(data, jax.random.key(0))]
  [6, 2, 2]
  """
  n = _check_arrays(arrays, "split")
  rng = _rng(key, "split")
  fractions = tuple(fractions)
  if not fractions or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
    raise DataError(f"split: fractions must be positive and sum to 1, got {fractions}")
  bounds = [0, *np.round(np.cumsum(fractions)[:-1] * n).astype(int).tolist(), n]
  if any(a >= b for a, b in zip(bounds, bounds[1:])):
    raise DataError(f"split: fractions {fractions} leave an empty part of n={n} rows")
  order = rng.permutation(n)
  return tuple({k: np.asarray(v)[order[a:b]] for k, v in arrays.items()}
               for a, b in zip(bounds, bounds[1:]))


def take(arrays: Mapping[str, np.ndarray], start: int, stop: int) -> Arrays:
  """Rows ``start:stop`` of every array (deterministic, no key).

  >>> take({"targets": np.arange(5)}, 1, 3)["targets"].tolist()
  [1, 2]
  """
  n = _check_arrays(arrays, "take")
  if not (isinstance(start, int | np.integer) and isinstance(stop, int | np.integer)
          and 0 <= start <= stop <= n):
    raise DataError(f"take: need 0 <= start <= stop <= {n}, got start={start!r} stop={stop!r}")
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


def _has_idx_files(data_dir) -> bool:
  return data_dir is not None and any(pathlib.Path(data_dir).glob("*-idx[13]-ubyte*"))


def load(name: str, *, key, data_dir=None, val_fraction: float = 0.1,
         normalize: bool = True, n_samples: int = 1000, noise: float = 0.2) -> Dataset:
  """Loads a dataset by name into a :class:`Dataset`; the entry point for experiments.

  * ``"two_moons"``: :func:`two_moons` (``n_samples``, ``noise``) split
    60/20/20 into train/val/test; inputs float32 ``[n, 2]``.
  * ``"mnist"``, ``"fashion_mnist"``: an IDX folder when ``data_dir`` holds
    ``*-idx?-ubyte*`` files (:func:`load_mnist_idx`), else tensorflow-datasets
    (``load_tfds``, which needs the dataset prepared as array_record).
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
  if name in ("mnist", "fashion_mnist") and _has_idx_files(data_dir):
    parts, source = load_mnist_idx(data_dir), f"idx:{data_dir}"
    parts = {k: {**v, "inputs": v["inputs"][..., None]} for k, v in parts.items()}
  else:
    from jaxtrain.datasets_tfds import load_tfds  # tfds is slow to import
    parts, source = load_tfds(name, data_dir=data_dir), f"tfds:{data_dir or 'default'}"
  if normalize:
    parts = {k: {**v, "inputs": normalize_images(v["inputs"])} for k, v in parts.items()}
  train, val = parts["train"], None
  if val_fraction > 0:
    train, val = split(train, jax.random.fold_in(key, 1), (1 - val_fraction, val_fraction))
  return Dataset(train, val, parts["test"], NUM_CLASSES[name], name, source)


def __getattr__(name: str):
  # Lazy re-export: importing tensorflow_datasets takes about a second.
  if name == "load_tfds":
    from jaxtrain.datasets_tfds import load_tfds
    return load_tfds
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
