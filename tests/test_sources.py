"""jaxtrain.datasets: two moons, MNIST IDX files, tfds (mocked and on disk), splits."""

import gzip
import importlib.util
import io
import pathlib
import shutil
import struct

import jax
import numpy as np
import pytest

from jaxtrain import datasets
from jaxtrain.data import DataError

FIRST_32_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7,
                         2, 8, 6, 9, 4, 0, 9, 1, 1, 2, 4, 3, 2, 7, 3, 8]
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# --- two moons ---------------------------------------------------------------

def test_two_moons_shapes_dtypes_and_balance():
  x, y = datasets.two_moons(jax.random.key(0), n_samples=1001, noise=0.1)
  assert x.shape == (1001, 2) and x.dtype == np.float32
  assert y.shape == (1001,) and y.dtype == np.int32
  assert np.bincount(y).tolist() == [500, 501]  # sklearn: n // 2 outer points


def test_two_moons_same_key_same_arrays_different_key_different():
  a = datasets.two_moons(jax.random.key(3), 200)
  b = datasets.two_moons(jax.random.key(3), 200)
  legacy = datasets.two_moons(jax.random.PRNGKey(3), 200)  # same bits, same data
  c = datasets.two_moons(jax.random.key(4), 200)
  for u, v in ((a, b), (a, legacy)):
    np.testing.assert_array_equal(u[0], v[0])
    np.testing.assert_array_equal(u[1], v[1])
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_two_moons_without_noise_lies_on_the_two_half_circles():
  x, y = datasets.two_moons(jax.random.key(1), n_samples=100, noise=0.0)
  outer, inner = x[y == 0].astype(np.float64), x[y == 1].astype(np.float64)
  np.testing.assert_allclose(np.hypot(*outer.T), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.hypot(inner[:, 0] - 1, inner[:, 1] - 0.5), 1.0, atol=1e-6)
  assert outer[:, 1].min() >= -1e-7 and inner[:, 1].max() <= 0.5 + 1e-7
  # The angles are exactly sklearn's linspace(0, pi, 50), in shuffled order.
  t_out = np.sort(np.arctan2(outer[:, 1], outer[:, 0]))
  t_in = np.sort(np.arctan2(0.5 - inner[:, 1], 1 - inner[:, 0]))
  np.testing.assert_allclose(t_out, np.linspace(0, np.pi, 50), atol=1e-5)
  np.testing.assert_allclose(t_in, np.linspace(0, np.pi, 50), atol=1e-5)
  assert not np.array_equal(y, np.sort(y))  # shuffled


def test_two_moons_noise_has_the_requested_scale():
  x0, y0 = datasets.two_moons(jax.random.key(2), 4000, noise=0.0)
  x1, y1 = datasets.two_moons(jax.random.key(2), 4000, noise=0.2)
  np.testing.assert_array_equal(y0, y1)
  assert abs(np.std(x1 - x0) - 0.2) < 0.01


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n_samples": 1}, "n_samples"),
    ({"n_samples": 10.0}, "n_samples"),
    ({"noise": -0.1}, "noise"),
    ({"noise": float("nan")}, "noise"),
    ({"key": 0}, "key"),
])
def test_two_moons_bad_arguments(kwargs, fragment):
  kwargs = {"key": jax.random.key(0), **kwargs}
  with pytest.raises(DataError, match=fragment):
    datasets.two_moons(**kwargs)


# --- MNIST IDX -----------------------------------------------------------------

def idx_bytes(array, magic=None) -> bytes:
  array = np.asarray(array, np.uint8)
  magic = 0x0800 | array.ndim if magic is None else magic
  return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_mnist(folder, n_train=6, n_test=4, gz=False):
  """A small synthetic MNIST folder; returns {file name: path}."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  paths = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                        ("labels-idx1", np.arange(n) % 10)):
      name = f"{prefix}-{kind}-ubyte"
      data = idx_bytes(array)
      path = folder / (f"{name}.gz" if gz else name)
      path.write_bytes(gzip.compress(data) if gz else data)
      paths[name] = path
  return paths


def test_real_mnist_idx(mnist_path):
  parts = datasets.load_mnist_idx(mnist_path)
  train, test = parts["train"], parts["test"]
  assert train["inputs"].shape == (6000, 28, 28) and train["inputs"].dtype == np.uint8
  assert train["targets"].shape == (6000,) and train["targets"].dtype == np.int32
  assert train["targets"][:32].tolist() == FIRST_32_TRAIN_LABELS
  assert test["inputs"].shape == (10000, 28, 28) and test["targets"].shape == (10000,)
  assert np.bincount(test["targets"]).tolist()[:3] == [980, 1135, 1032]
  assert train["inputs"].max() == 255 and train["inputs"][:, 0, 0].max() == 0


def test_real_mnist_plain_files_read_like_gzipped(mnist_path, tmp_path):
  for i, name in enumerate(MNIST_NAMES):  # a mix of plain and gzipped files
    source = mnist_path / f"{name}.gz"
    if i % 2 == 0:
      (tmp_path / name).write_bytes(gzip.decompress(source.read_bytes()))
    else:
      shutil.copy(source, tmp_path / f"{name}.gz")
  plain, gz = datasets.load_mnist_idx(tmp_path), datasets.load_mnist_idx(mnist_path)
  for split in ("train", "test"):
    for field in ("inputs", "targets"):
      np.testing.assert_array_equal(plain[split][field], gz[split][field])


def test_real_mnist_truncated_copy_is_rejected(mnist_path, tmp_path):
  for name in MNIST_NAMES:
    shutil.copy(mnist_path / f"{name}.gz", tmp_path / f"{name}.gz")
  target = tmp_path / "t10k-labels-idx1-ubyte.gz"
  target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-7]))
  with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: truncated payload: 9993 bytes"):
    datasets.load_mnist_idx(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_synthetic_idx_round_trip(tmp_path, gz):
  write_mnist(tmp_path, n_train=6, n_test=4, gz=gz)
  parts = datasets.load_mnist_idx(tmp_path)
  assert parts["train"]["inputs"].shape == (6, 28, 28)
  assert parts["test"]["targets"].tolist() == [0, 1, 2, 3]


def _flip(path, position):
  data = bytearray(path.read_bytes())
  data[position] ^= 0xFF
  path.write_bytes(bytes(data))


def _cut(path, n):
  path.write_bytes(path.read_bytes()[:-n])


# Each case corrupts one file of a synthetic folder: (gz, corruption, file, message).
CORRUPTIONS = {
    "missing file": (False, lambda p: p["t10k-labels-idx1-ubyte"].unlink(),
                     "t10k-labels-idx1-ubyte", "looked for t10k-labels-idx1-ubyte and"),
    "bad magic": (False, lambda p: p["train-labels-idx1-ubyte"].write_bytes(
        idx_bytes(np.zeros(6), magic=0x0803)), "train-labels-idx1-ubyte",
        "bad IDX magic 0x00000803, expected 0x00000801"),
    "images magic": (False, lambda p: _flip(p["t10k-images-idx3-ubyte"], 2),
                     "t10k-images-idx3-ubyte", "bad IDX magic 0x0000f703"),
    "truncated payload": (False, lambda p: _cut(p["train-images-idx3-ubyte"], 100),
                          "train-images-idx3-ubyte", "truncated payload: 4604 bytes"),
    "trailing bytes": (False, lambda p: p["t10k-labels-idx1-ubyte"].write_bytes(
        p["t10k-labels-idx1-ubyte"].read_bytes() + b"\0"), "t10k-labels-idx1-ubyte",
        "trailing bytes"),
    "truncated header": (False, lambda p: p["train-images-idx3-ubyte"].write_bytes(
        b"\0\0\x08\x03\0\0"), "train-images-idx3-ubyte", "truncated IDX header"),
    "empty file": (False, lambda p: p["train-labels-idx1-ubyte"].write_bytes(b""),
                   "train-labels-idx1-ubyte", "shorter than 4 bytes"),
    "gzip cut short": (True, lambda p: _cut(p["train-images-idx3-ubyte"], 40),
                       "train-images-idx3-ubyte.gz", "corrupted gzip"),
    "gzip crc": (True, lambda p: _flip(p["t10k-images-idx3-ubyte"], -6),
                 "t10k-images-idx3-ubyte.gz", "corrupted gzip"),
    "gzip stream": (True, lambda p: _flip(p["train-labels-idx1-ubyte"], 12),
                    "train-labels-idx1-ubyte.gz", "corrupted gzip"),
    "count mismatch": (False, lambda p: p["train-labels-idx1-ubyte"].write_bytes(
        idx_bytes(np.zeros(5))), "train-labels-idx1-ubyte",
        "5 labels but train-images-idx3-ubyte holds 6 images"),
    "label range": (False, lambda p: p["t10k-labels-idx1-ubyte"].write_bytes(
        idx_bytes([1, 2, 10, 3])), "t10k-labels-idx1-ubyte", "label 10 outside 0..9"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupted_idx_raises_data_error_naming_the_file(tmp_path, case):
  gz, corrupt, filename, fragment = CORRUPTIONS[case]
  paths = write_mnist(tmp_path / "mnist", gz=gz)
  corrupt({name: path for name, path in paths.items()})
  with pytest.raises(DataError) as info:
    datasets.load_mnist_idx(tmp_path / "mnist")
  message = str(info.value)
  assert filename in message and fragment in message, message
  assert "\n" not in message


def test_missing_idx_folder(tmp_path):
  with pytest.raises(DataError, match=r"data_dir .*nowhere: not an existing directory"):
    datasets.load_mnist_idx(tmp_path / "nowhere")


# --- tensorflow-datasets -------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


def mock_tfds(n):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name, shape", [
    ("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_tfds_mocked(name, shape):
  with mock_tfds(5):
    parts = datasets.load_tfds(name, splits=("train", "test[:50%]"))
  assert list(parts) == ["train", "test[:50%]"]
  for part in parts.values():
    assert part["inputs"].shape == (5, *shape) and part["inputs"].dtype == np.uint8
    assert part["targets"].shape == (5,) and part["targets"].dtype == np.int32
    assert 0 <= part["targets"].min() and part["targets"].max() < 10


def write_array_record_mnist(data_dir, images, labels):
  """Prepares a real on-disk tfds 'mnist' (array_record), without TensorFlow."""
  from array_record.python import array_record_module
  from PIL import Image

  builder = tfds.builder("mnist", data_dir=data_dir, file_format="array_record")
  features, path = builder.info.features, pathlib.Path(builder.data_dir)
  path.mkdir(parents=True)
  splits = []
  for split in ("train", "test"):
    writer = array_record_module.ArrayRecordWriter(
        f"{path}/mnist-{split}.array_record-00000-of-00001", "group_size:1")
    for image, label in zip(images, labels):
      png = io.BytesIO()
      Image.fromarray(image[..., 0]).save(png, format="PNG")  # bytes: no TF encode
      writer.write(features.serialize_example({"image": png.getvalue(), "label": label}))
    writer.close()
    template = tfds.core.ShardedFileTemplate(
        data_dir=path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="mnist", split=split, filetype_suffix="array_record")
    splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(labels)], num_bytes=0,
                                      filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.set_file_format("array_record")
  builder.info.write_to_directory(path)


def test_load_tfds_reads_a_prepared_array_record_dataset(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
  write_array_record_mnist(tmp_path, images, [3, 1, 4, 1, 5, 9, 2])
  parts = datasets.load_tfds("mnist", data_dir=tmp_path)
  np.testing.assert_array_equal(parts["test"]["inputs"], images)
  assert parts["train"]["targets"].tolist() == [3, 1, 4, 1, 5, 9, 2]


def test_load_tfds_unprepared_data_dir(tmp_path):
  with pytest.raises(DataError, match=r"'mnist' is not readable as array_record in .*prepare"):
    datasets.load_tfds("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "imagenet"}, "unknown dataset name 'imagenet'; supported: mnist, fashion_mnist, "
                           "cifar10"),
    ({"name": "mnist", "splits": "train"}, "splits must be"),
    ({"name": "mnist", "splits": ("train", "train")}, "splits must be"),
])
def test_load_tfds_bad_arguments(kwargs, fragment):
  with pytest.raises(DataError, match=fragment):
    datasets.load_tfds(**kwargs)


# --- load ----------------------------------------------------------------------

def test_load_two_moons_is_60_20_20_and_key_driven():
  ds = datasets.load("two_moons", key=jax.random.key(0))
  assert [len(p["targets"]) for p in (ds.train, ds.val, ds.test)] == [600, 200, 200]
  assert ds.num_classes == 2 and ds.input_shape == (2,) and ds.name == "two_moons"
  again = datasets.load("two_moons", key=jax.random.PRNGKey(0))
  other = datasets.load("two_moons", key=jax.random.key(1))
  np.testing.assert_array_equal(ds.test["inputs"], again.test["inputs"])
  assert not np.array_equal(ds.test["inputs"], other.test["inputs"])


def test_load_mnist_from_idx_folder(tmp_path):
  write_mnist(tmp_path, n_train=20, n_test=4, gz=True)
  ds = datasets.load("mnist", key=jax.random.key(0), data_dir=tmp_path, val_fraction=0.25)
  assert ds.train["inputs"].shape == (15, 28, 28, 1) and ds.val["inputs"].shape == (5, 28, 28, 1)
  assert ds.test["inputs"].dtype == np.float32 and ds.test["inputs"].max() <= 1.0
  assert ds.source == f"idx:{tmp_path}" and ds.num_classes == 10
  raw = datasets.load("mnist", key=jax.random.key(0), data_dir=tmp_path, val_fraction=0,
                      normalize=False)
  assert raw.val is None and raw.train["inputs"].dtype == np.uint8
  assert raw.train["targets"].tolist() == [i % 10 for i in range(20)]  # no split: kept order


def test_load_real_mnist(mnist_path):
  ds = datasets.load("mnist", key=jax.random.key(0), data_dir=mnist_path)
  assert ds.train["inputs"].shape == (5400, 28, 28, 1) and ds.val["targets"].shape == (600,)
  assert ds.test["inputs"].shape == (10000, 28, 28, 1)


def test_load_cifar10_through_tfds_mock():
  with mock_tfds(10):
    ds = datasets.load("cifar10", key=jax.random.key(0), val_fraction=0.2)
  assert ds.input_shape == (32, 32, 3) and len(ds.train["targets"]) == 8
  assert ds.val["inputs"].dtype == np.float32 and ds.source == "tfds:default"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "moons"}, "unknown dataset name 'moons'; supported: two_moons, mnist"),
    ({"name": "two_moons", "key": 7}, "key must be a jax.random key, got 7"),
    ({"name": "mnist", "val_fraction": 1.0}, "val_fraction must be in"),
])
def test_load_bad_arguments(kwargs, fragment):
  kwargs = {"key": jax.random.key(0), **kwargs}
  with pytest.raises(DataError, match=fragment):
    datasets.load(**kwargs)


# --- split, take, standardize, normalize_images -------------------------------

def rows(n=100):
  return {"inputs": np.arange(2.0 * n).reshape(n, 2), "targets": np.arange(n)}


@pytest.mark.parametrize("n, fractions, sizes", [
    (100, (0.6, 0.2, 0.2), [60, 20, 20]),
    (10, (0.5, 0.5), [5, 5]),
    (7, (0.6, 0.2, 0.2), [4, 2, 1]),
    (1000, (0.9, 0.1), [900, 100]),
])
def test_split_sizes_partition_the_rows(n, fractions, sizes):
  parts = datasets.split(rows(n), jax.random.key(0), fractions)
  assert [len(p["targets"]) for p in parts] == sizes
  ids = np.concatenate([p["targets"] for p in parts])
  assert sorted(ids.tolist()) == list(range(n))
  for p in parts:  # rows stay aligned across arrays
    np.testing.assert_array_equal(p["inputs"][:, 0], 2 * p["targets"])


def test_split_is_a_function_of_the_key():
  a = datasets.split(rows(), jax.random.key(5))
  b = datasets.split(rows(), jax.random.PRNGKey(5))
  c = datasets.split(rows(), jax.random.key(6))
  assert [p["targets"].tolist() for p in a] == [p["targets"].tolist() for p in b]
  assert a[0]["targets"].tolist() != c[0]["targets"].tolist()
  assert a[0]["targets"].tolist() != sorted(a[0]["targets"].tolist())


@pytest.mark.parametrize("arrays, fractions, fragment", [
    (rows(), (0.5, 0.4), "sum to 1"),
    (rows(), (1.2, -0.2), "positive"),
    (rows(2), (0.6, 0.2, 0.2), "empty part of n=2"),
    ({"inputs": np.zeros(3), "targets": np.zeros(4)}, (0.5, 0.5), "leading axis"),
    ({}, (0.5, 0.5), "non-empty dict"),
])
def test_split_bad_arguments(arrays, fractions, fragment):
  with pytest.raises(DataError, match=fragment):
    datasets.split(arrays, jax.random.key(0), fractions)


def test_take_is_a_deterministic_slice():
  part = datasets.take(rows(10), 2, 5)
  assert part["targets"].tolist() == [2, 3, 4] and part["inputs"].shape == (3, 2)
  assert datasets.take(rows(10), 4, 4)["targets"].size == 0
  for start, stop in ((-1, 3), (5, 4), (0, 11)):
    with pytest.raises(DataError, match=f"start={start} stop={stop}"):
      datasets.take(rows(10), start, stop)


def test_standardize_uses_train_statistics_only():
  rng = np.random.default_rng(0)
  train = rng.normal([5.0, -3.0, 0.0], [2.0, 0.5, 0.0], size=(500, 3))
  test = rng.normal(100.0, 10.0, size=(50, 3))
  tr, te = datasets.standardize(train, test)
  assert tr.dtype == te.dtype == np.float32
  np.testing.assert_allclose(tr.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(tr.std(0), [1.0, 1.0, 0.0], atol=1e-5)  # constant: centred
  expected = (test - train.mean(0)) / np.where(train.std(0) > 0, train.std(0), 1.0)
  np.testing.assert_allclose(te, expected, rtol=1e-5)
  (tr_alone,) = datasets.standardize(train)
  np.testing.assert_array_equal(tr_alone, tr)  # the other arrays never leak in
  with pytest.raises(DataError, match=r"others\[1\] has shape \(4, 2\)"):
    datasets.standardize(train, test, np.zeros((4, 2)))


def test_normalize_images():
  x = np.array([[0, 128], [255, 51]], np.uint8)[..., None]
  out = datasets.normalize_images(x)
  assert out.dtype == np.float32 and out.shape == x.shape
  np.testing.assert_allclose(out.ravel(), [0.0, 128 / 255, 1.0, 0.2], rtol=1e-6)
  np.testing.assert_allclose(datasets.normalize_images(x, mean=0.5, std=0.5).ravel(),
                             (x.ravel() / 255 - 0.5) / 0.5, atol=1e-6)
  with pytest.raises(DataError, match="must be uint8, got dtype float32"):
    datasets.normalize_images(out)
  with pytest.raises(DataError, match="std must be > 0"):
    datasets.normalize_images(x, std=0.0)


def test_load_from_a_folder_without_idx_files_names_what_it_looked_for(tmp_path):
  """It used to fall through to tfds and report a TFRECORD NotImplementedError."""
  with pytest.raises(DataError, match=r"neither MNIST IDX files \(looked for "
                                      r"train-images-idx3-ubyte\[\.gz\]"):
    datasets.load("mnist", key=jax.random.key(0), data_dir=tmp_path)


def test_downloading_without_tensorflow_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here: tfds could try to download")
  with pytest.raises(DataError, match="needs TensorFlow and network access.*--extra tfds"):
    datasets.load_tfds("mnist", data_dir=tmp_path, download=True)
