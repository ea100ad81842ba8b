"""tensorflow-datasets sources, read with ``tfds.data_source``: no TensorFlow needed.

``tfds.load`` builds a ``tf.data`` pipeline and so imports TensorFlow, which this
project does not install. ``tfds.data_source`` instead reads a dataset prepared
in the array_record format and decodes its examples with NumPy and Pillow.
*Preparing* a dataset (download + encode) still needs TensorFlow, once, on any
machine: ``tfds.builder(name, file_format="array_record").download_and_prepare()``.
The prepared folder (``<data_dir>/<name>/<version>/``) can then be copied here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxtrain.data.arrays import Arrays, DataError

#: name -> shape of one image; labels are int in [0, 10) for all three.
TFDS_IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}"


def open_error(where: str, name: str, data_dir, e: BaseException) -> DataError:
  """The one-line error for a tfds dataset that ``tfds.data_source`` cannot open."""
  place = data_dir or "the default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  if isinstance(e, ImportError):
    # tfds needs TensorFlow (and its own extras) to download and prepare.
    return DataError(
        f"{where}: {name!r} is not prepared in {place}, and preparing it needs "
        f"TensorFlow and network access ({_one_line(e)}): install the tfds extra "
        "(uv sync --extra tfds) where the network is reachable, run "
        f"tfds.builder({name!r}, file_format='array_record').download_and_prepare() "
        "and copy the prepared folder here, or use an IDX folder")
  return DataError(
      f"{where}: {name!r} is not readable as array_record in {place} ({_one_line(e)}); "
      f"prepare it once where TensorFlow is installed: tfds.builder({name!r}, "
      f"file_format='array_record').download_and_prepare()")


def load_tfds(name: str, *, data_dir=None, splits: Sequence[str] = ("train", "test"),
              download: bool = False) -> dict[str, Arrays]:
  """Reads whole splits of a tensorflow-datasets image dataset into numpy arrays.

  Args:
    name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
    data_dir: the tfds data dir; None uses ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``.
    splits: tfds split names (slices such as ``"train[:10%]"`` work too).
    download: let tfds download and prepare the dataset if it is missing; this
      needs TensorFlow and network access.

  Returns:
    ``{split: {"inputs": uint8 [n, H, W, C], "targets": int32 [n]}}`` with
    the splits in the order given; MNIST-like images keep their channel axis,
    ``[n, 28, 28, 1]``; CIFAR-10 is ``[n, 32, 32, 3]``.

  Raises:
    DataError: unknown name, bad splits, or a dataset that cannot be opened
      (e.g. not prepared as array_record under ``data_dir``).

  >>> import tensorflow_datasets as tfds
  >>> with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
  ...   parts = load_tfds("mnist")
  >>> parts["train"]["inputs"].shape, parts["test"]["targets"].dtype
  ((3, 28, 28, 1), dtype('int32'))
  """
  if name not in TFDS_IMAGE_SHAPES:
    raise DataError(f"load_tfds: unknown dataset name {name!r}; "
                    f"supported: {', '.join(TFDS_IMAGE_SHAPES)}")
  if (isinstance(splits, str) or not splits or len(set(splits)) != len(splits)
      or not all(isinstance(s, str) for s in splits)):
    raise DataError(f"load_tfds: splits must be a non-empty sequence of names, got {splits!r}")
  import tensorflow_datasets as tfds  # slow import, only when used

  where = data_dir or "the default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  try:
    sources = tfds.data_source(name, split=list(splits), data_dir=data_dir, download=download)
  except Exception as e:  # tfds raises many types; keep the cause chained.
    raise open_error("load_tfds", name, data_dir, e) from e
  shape = TFDS_IMAGE_SHAPES[name]
  out = {}
  for split_name, source in zip(splits, sources):
    n = len(source)
    if n == 0:
      raise DataError(f"load_tfds: split {split_name!r} of {name!r} in {where} is empty")
    inputs = np.empty((n, *shape), np.uint8)
    targets = np.empty((n,), np.int32)
    # Row by row: the mocked source of tfds.testing.mock_data lacks a working
    # __getitems__, and decoding (PNG via Pillow) dominates either way.
    for i in range(n):
      example = source[i]
      image = np.asarray(example["image"])
      if image.shape != shape:
        raise DataError(f"load_tfds: {name!r} split {split_name!r} example {i} has image "
                        f"shape {image.shape}, expected {shape}")
      inputs[i], targets[i] = image, int(example["label"])
    out[split_name] = {"inputs": inputs, "targets": targets}
  return out
