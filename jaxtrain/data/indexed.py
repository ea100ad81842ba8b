"""Random-access sources: data read by index, for datasets bigger than memory.

A :class:`Source` has a length and reads many rows at once,
``source.read(indices) -> {"inputs": [k, ...], "targets": [k]}``. Training
streams from one by reading each step's rows in the epoch order
:func:`jaxtrain.data.permutation` draws from (seed, epoch), so a resumed run
needs no iterator state: its position is the global step. Sources:

* :class:`ArraySource`: a dict of arrays in memory, or numpy memmaps;
  :func:`npy_source` opens a folder of ``.npy`` files, read row by row
  (:class:`NpyFile`), and :func:`write_npy` writes one, block by block, from any
  source.
* :class:`RecordSource`: anything with ``__len__`` and ``__getitem__`` returning
  dict records (``__getitems__`` is used when present): a tfds ``data_source``
  (ArrayRecord), a Grain ``MapDataset`` or data source, a list of dicts.
  :func:`tfds_source` opens a tfds dataset prepared as array_record by name.
* :meth:`Source.map` (a row-wise transform of read rows, e.g.
  :func:`jaxtrain.data.normalize_images`) and :meth:`Source.subset` (a view on
  some rows, e.g. a validation split).

>>> import numpy as np
>>> source = ArraySource({"inputs": np.arange(10.0)[:, None], "targets": np.arange(10)})
>>> len(source), source.read(np.array([3, 1]))["targets"].tolist()
(10, [3, 1])
>>> source.subset(np.array([5, 6, 7])).map(lambda rows: {**rows, "inputs": 2 * rows["inputs"]}
...                                        ).read(np.array([2]))["inputs"].tolist()
[[14.0]]
"""

from __future__ import annotations

import mmap
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.data.arrays import Arrays, DataError, check_length


class Source:
  """Rows read by index: ``len(source)`` rows, ``source.read(indices)``.

  Subclasses implement ``__len__`` and :meth:`_read`; ``read`` checks the
  indices and names the source in errors. Rows must be the same wherever and
  however often they are read (training reads each step's rows in any process).

  Attributes:
    name: what errors and logs call the source (e.g. a folder).
  """

  name = "source"

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, indices: np.ndarray) -> Arrays:
    raise NotImplementedError

  def read(self, indices) -> Arrays:
    """Rows ``indices`` (a 1-D integer array) of every field, in that order."""
    indices = np.asarray(indices)
    n = len(self)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise DataError(f"{self.name}: indices must be a 1-D integer array, got "
                      f"{indices.dtype} of shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      bad = indices[(indices < 0) | (indices >= n)][0]
      raise DataError(f"{self.name}: index {bad} is out of range for {n} rows")
    return self._read(indices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """One row, e.g. ``source[0]["inputs"]``."""
    return {k: v[0] for k, v in self.read(np.array([index])).items()}

  def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{field: (shape of one row, dtype)}``, from row 0."""
    return {k: (v.shape[1:], v.dtype) for k, v in self.read(np.array([0])).items()}

  def row_bytes(self) -> int:
    """Bytes of one row once read (all fields)."""
    return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.fields().values())

  def map(self, fn: Callable[[Arrays], Arrays], name: str | None = None) -> Source:
    """A source whose rows are ``fn(rows)`` of this one's; ``fn`` must treat
    rows independently (it sees any subset of rows, in any grouping)."""
    return _Mapped(self, fn, name or self.name)

  def subset(self, indices) -> Source:
    """The rows ``indices`` of this source, as a source of ``len(indices)`` rows."""
    return _Subset(self, np.asarray(indices))

  def to_arrays(self, block: int = 65536) -> Arrays:
    """Every row in memory, read ``block`` rows at a time."""
    parts = [self.read(np.arange(a, min(a + block, len(self)))) for a in range(0, len(self), block)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class ArraySource(Source):
  """A dict of equally long arrays (numpy arrays or memmaps) as a source.

  Reading a memmap's rows touches only their pages, so a dataset on disk need
  not fit in memory. Memmaps read ahead no more than the rows cover
  (``MADV_RANDOM``), and after each read their pages are unmapped from the
  process again (``MADV_DONTNEED``; the page cache keeps them), so its resident
  memory does not grow with the dataset.
  """

  def __init__(self, arrays: Mapping[str, Any], name: str = "arrays"):
    self._n = check_length(arrays, name, DataError)
    self.arrays, self.name = dict(arrays), name
    self._maps = [m for m in (getattr(v, "_mmap", None) for v in self.arrays.values())
                  if m is not None and hasattr(m, "madvise")]
    for m in self._maps:
      # Rows are read in a random order: read ahead only what they cover.
      m.madvise(mmap.MADV_RANDOM)

  def __len__(self) -> int:
    return self._n

  def _read(self, indices):
    rows = {k: np.asarray(v[indices]) for k, v in self.arrays.items()}
    for m in self._maps:
      # The pages read (and the kernel's fault-around, 64 KB a row) would stay
      # mapped into this process, its RSS growing to the file's size; the page
      # cache keeps them, and a later read maps them again.
      m.madvise(mmap.MADV_DONTNEED)
    return rows


class RecordSource(Source):
  """Records read by index, as from a tfds ``data_source`` or a Grain source.

  Args:
    records: has ``__len__`` and ``__getitem__(i) -> dict``; ``__getitems__``
      (a batch of indices) is used when it has one.
    fields: ``{field: record key}``, default ``{"inputs": "image", "targets":
      "label"}`` (tfds image datasets).
    dtypes: ``{field: dtype}`` to cast to (default: targets int32).
    name: what errors call the source.
    files: the files behind the records: a failed read names the damaged one.

  >>> records = [{"image": np.full((2,), i, np.uint8), "label": i % 2} for i in range(4)]
  >>> RecordSource(records).read(np.array([3, 0]))["inputs"].tolist()
  [[3, 3], [0, 0]]
  """

  def __init__(self, records, fields: Mapping[str, str] | None = None,
               dtypes: Mapping[str, Any] | None = None, name: str = "records",
               files: Sequence[str] = ()):
    self.records, self.name, self.files = records, name, [str(f) for f in files]
    self.fields_map = dict(fields or {"inputs": "image", "targets": "label"})
    self.dtypes = dict({"targets": np.int32} if dtypes is None else dtypes)
    try:
      self._n = len(records)
    except Exception as e:
      raise DataError(f"{name}: cannot tell its length ({_one_line(e)})") from e
    if self._n == 0:
      raise DataError(f"{name} is empty")
    self._batched = hasattr(records, "__getitems__")
    if self._batched:
      try:  # some sources (tfds's mocked ones) have a __getitems__ that fails
        records.__getitems__([0])
      except TypeError:
        self._batched = False
      except Exception as e:  # a damaged file: name it now
        raise self._failed(e) from e

  def __len__(self) -> int:
    return self._n

  def _read(self, indices):
    try:
      if self._batched:
        records = self.records.__getitems__([int(i) for i in indices])
      else:
        records = [self.records[int(i)] for i in indices]
      out = {}
      for field, key in self.fields_map.items():
        out[field] = np.stack([np.asarray(r[key]) for r in records])
        if field in self.dtypes:
          out[field] = out[field].astype(self.dtypes[field])
      return out
    except DataError:
      raise
    except Exception as e:  # a reader's own error type: name the damaged file
      raise self._failed(e) from e

  def _failed(self, e: BaseException) -> DataError:
    return DataError(f"{self.name}: reading rows failed in {_damaged(self.files)} "
                     f"({_one_line(e)})")


class _Mapped(Source):
  def __init__(self, base: Source, fn, name):
    self.base, self.fn, self.name = base, fn, name

  def __len__(self):
    return len(self.base)

  def _read(self, indices):
    return self.fn(self.base._read(indices))


class _Subset(Source):
  def __init__(self, base: Source, indices: np.ndarray):
    if indices.ndim != 1 or not len(indices) or (indices.min() < 0) or indices.max() >= len(base):
      raise DataError(f"{base.name}: subset indices must be a non-empty 1-D array in "
                      f"[0, {len(base)}), got shape {indices.shape}")
    self.base, self.indices, self.name = base, indices, base.name

  def __len__(self):
    return len(self.indices)

  def _read(self, indices):
    return self.base._read(self.indices[indices])


def as_source(data) -> Source:
  """``data`` as a :class:`Source`: a source stays, a dict of arrays becomes an
  :class:`ArraySource`."""
  return data if isinstance(data, Source) else ArraySource(data)


def length(data) -> int:
  """Rows of a source or a dict of arrays."""
  return len(data) if isinstance(data, Source) else check_length(data)


def head(data, k: int) -> Arrays:
  """The first ``k`` rows (fewer if shorter) of a source or a dict of arrays."""
  if isinstance(data, Source):
    return data.read(np.arange(min(k, len(data))))
  return {name: np.asarray(v[:k]) for name, v in data.items()}


class NpyFile:
  """One ``.npy`` file read row by row with ``os.pread`` (no memory map).

  Behaves as a read-only array for :class:`ArraySource`: ``len``, ``shape``,
  ``dtype`` and ``file[indices]``. Only the rows asked for are read (runs of
  consecutive rows in one call), so neither the process's memory nor its
  mapped pages grow with the file, as they do for a memmap read at random.
  """

  def __init__(self, path):
    self.path = str(path)
    try:
      with open(self.path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        self.offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
      raise DataError(f"npy_source: cannot open {self.path} ({_one_line(e)})") from e
    if fortran or dtype.hasobject or not shape:
      raise DataError(f"npy_source: {self.path} must hold a C-ordered array of numbers with "
                      f"a leading row axis, got shape {shape}, dtype {dtype}")
    self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
    self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(self.path)
    if size < self.offset + self.row_bytes * shape[0]:
      raise DataError(f"npy_source: {self.path} is truncated: {size} bytes, its header "
                      f"promises {self.offset + self.row_bytes * shape[0]}")
    self._fd = os.open(self.path, os.O_RDONLY)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, indices) -> np.ndarray:
    indices = np.asarray(indices, np.int64).reshape(-1)
    order = np.argsort(indices, kind="stable")
    ranked = indices[order]
    rows = np.empty((len(indices), *self.shape[1:]), self.dtype)
    raw = rows.reshape(len(indices), -1).view(np.uint8).reshape(len(indices), self.row_bytes)
    breaks = np.flatnonzero(np.diff(ranked) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(ranked)]):
      want = (b - a) * self.row_bytes
      got = os.preadv(self._fd, [raw[a:b]], self.offset + int(ranked[a]) * self.row_bytes)
      if got != want:
        raise DataError(f"npy_source: {self.path}: read {got} of {want} bytes at row "
                        f"{int(ranked[a])} (the file shrank?)")
    out = np.empty_like(rows)
    out[order] = rows
    return out

  def __del__(self, close=os.close):  # os may be gone at interpreter exit
    fd = getattr(self, "_fd", None)
    if fd is not None:
      close(fd)


def npy_source(directory, fields: Sequence[str] = ("inputs", "targets")) -> ArraySource:
  """A folder of ``<field>.npy`` files (e.g. from :func:`write_npy`), each read
  row by row on demand (:class:`NpyFile`).

  A ``mask.npy`` beside them is read too (row weights, see
  :func:`jaxtrain.data.batches`).
  """
  folder = pathlib.Path(directory)
  names = list(fields) + (["mask"] if (folder / "mask.npy").exists() else [])
  arrays = {}
  for field in names:
    path = folder / f"{field}.npy"
    if not path.is_file():
      raise DataError(f"npy_source: missing {path}")
    arrays[field] = NpyFile(path)
  lengths = {f: len(a) for f, a in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise DataError(f"npy_source: the files in {folder} hold different numbers of rows: "
                    f"{lengths}")
  return ArraySource(arrays, name=str(folder))


def write_npy(directory, data, block: int = 65536) -> ArraySource:
  """Writes a source (or dict of arrays) as ``<field>.npy`` files, ``block``
  rows at a time (never the whole set in memory), and opens them."""
  source = as_source(data)
  folder = pathlib.Path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  n = len(source)
  outs = {k: np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=dtype,
                                       shape=(n, *shape))
          for k, (shape, dtype) in source.fields().items()}
  for a in range(0, n, block):
    rows = source.read(np.arange(a, min(a + block, n)))
    for k, out in outs.items():
      out[a:a + len(rows[k])] = rows[k]
  for out in outs.values():
    out.flush()
  del outs
  return npy_source(folder, [k for k in source.fields() if k != "mask"])


def tfds_source(name: str, split: str, *, data_dir=None) -> RecordSource:
  """A split of a tfds dataset prepared as array_record, read row by row on
  demand (``tfds.data_source``: no TensorFlow, no full load).

  Records are ``{"image", "label"}`` as tfds image datasets have them; inputs
  keep tfds's dtype (uint8 images): map them, e.g. with
  :func:`jaxtrain.data.normalize_images`.
  """
  import tensorflow_datasets as tfds  # slow import, only when used

  from jaxtrain.data.tfds import open_error

  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises many types; keep the cause chained.
    raise open_error("tfds_source", name, data_dir, e) from e
  try:
    files = records.dataset_info.splits[split].filepaths
  except Exception:  # a split slice ("train[:10%]") or a mocked source
    files = []
  where = f"tfds {name!r} split {split!r} in {data_dir or 'the default data_dir'}"
  return RecordSource(records, name=where, files=files)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _damaged(files: Sequence[str]) -> str:
  """The file of ``files`` that cannot be read through (ArrayRecord), else all."""
  if not files:
    return "its records"
  if len(files) > 1:
    try:
      from array_record.python import array_record_module
      for path in files:
        try:
          reader = array_record_module.ArrayRecordReader(path)
          reader.read(list(range(reader.num_records())))
          reader.close()
        except Exception:
          return path
    except ImportError:
      pass
  return ", ".join(files)
