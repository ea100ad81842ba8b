"""MNIST from a local folder of IDX files, or from tensorflow-datasets: the one
reader every experiment and :func:`jaxtrain.data.load` use."""

from __future__ import annotations

import gzip
import math
import pathlib
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from jaxtrain.data.arrays import Arrays, DataError

_IDX_TYPE_UBYTE = 0x08
#: The four files of an IDX folder, by split: (images, labels).
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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
  jaxtrain.data.arrays.DataError: data_dir /no/such/dir: not an existing directory
  """
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f"data_dir {data_dir}: not an existing directory")
  out = {}
  for split, (images_name, labels_name) in IDX_FILES.items():
    images_path = _find_idx(data_dir, images_name)
    labels_path = _find_idx(data_dir, labels_name)
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
      raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} "
                      f"holds {len(images)} images")
    if labels.size and labels.max() > 9:
      raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    out[split] = {"inputs": images, "targets": labels.astype(np.int32)}
  return out


def has_idx_files(data_dir) -> bool:
  """Whether ``data_dir`` holds any ``*-idx[13]-ubyte*`` file."""
  return data_dir is not None and any(pathlib.Path(data_dir).glob("*-idx[13]-ubyte*"))


def load_mnist(data_dir=None, *, splits: Sequence[str] = ("train", "test"),
               arg: str = "data_dir") -> dict[str, Arrays]:
  """MNIST's splits as uint8 ``[n, 28, 28, 1]`` images and int32 labels.

  Args:
    data_dir: a folder of the four IDX files (:func:`load_mnist_idx`), or
      ``None`` for tensorflow-datasets (prepared as array_record in its
      default data dir, see :func:`jaxtrain.data.load_tfds`).
    splits: ``"train"`` and/or ``"test"``.
    arg: what to call ``data_dir`` in error messages (e.g. ``"--data-dir"``).

  Returns:
    ``{split: {"inputs", "targets"}}`` for each of ``splits``.

  >>> load_mnist("/no/such/dir", arg="--data-dir")
  Traceback (most recent call last):
  jaxtrain.data.arrays.DataError: --data-dir '/no/such/dir': not an existing directory
  """
  unknown = [s for s in splits if s not in IDX_FILES]
  if unknown or not splits:
    raise DataError(f"load_mnist: splits must be among {sorted(IDX_FILES)}, got {splits!r}")
  if data_dir is None:
    from jaxtrain.data.tfds import load_tfds

    return load_tfds("mnist", splits=tuple(splits))
  if not pathlib.Path(data_dir).is_dir():
    raise DataError(f"{arg} {str(data_dir)!r}: not an existing directory")
  parts = load_mnist_idx(data_dir)
  return {s: {**parts[s], "inputs": parts[s]["inputs"][..., None]} for s in splits}
