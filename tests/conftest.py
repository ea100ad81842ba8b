"""Test setup: four fake CPU devices, set before JAX starts."""

import os
import pathlib

# Must run before jax initialises its backends (conftest is imported first).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def mnist_dir() -> pathlib.Path | None:
  """The shared MNIST IDX folder, or None when this machine lacks it."""
  for candidate in (os.environ.get("JAXTRAIN_MNIST_DIR"), REPO.parent / "shared/data/mnist"):
    if candidate and (pathlib.Path(candidate) / "t10k-labels-idx1-ubyte.gz").exists():
      return pathlib.Path(candidate)
  return None


@pytest.fixture
def mnist_path():
  path = mnist_dir()
  if path is None:
    pytest.skip(
        "MNIST IDX files not found in ../shared/data/mnist or $JAXTRAIN_MNIST_DIR"
    )
  return path


@pytest.fixture(autouse=True, scope="session")
def _four_devices():
  assert jax.device_count() == 4, "tests expect 4 fake CPU devices"


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
  """Experiments' CLI turns on JAX's persistent compilation cache
  ($JAXTRAIN_CACHE_DIR, else ~/.cache): tests run it with the cache off, so they
  never write to the home directory, and restore JAX's settings afterwards.
  Off, not a directory of this session's: a worker reading back an executable
  it had written itself crashed (a segmentation fault in
  compilation_cache.get_executable_and_time) in 3 of 7 suite runs on
  2026-12-06, twice before that; tests that are about the cache set their own."""
  from jax.experimental.compilation_cache import compilation_cache

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAXTRAIN_CACHE_DIR", "off")
    patch.delenv("JAXTRAIN_DEBUG", raising=False)
    compilation_cache.reset_cache()
    yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def _cache_stays_with_its_test():
  """A test that runs an experiment's CLI in this process turns JAX's persistent
  compilation cache on (as a user's run does); the tests after it get the
  settings they had, not that test's cache. (Two fresh-clone runs of the suite
  crashed a worker in test_stream while it read an entry that an earlier test's
  CLI run had left in the worker's cache: a segmentation fault in
  compilation_cache.get_executable_and_time, not reproduced in isolation.)"""
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  yield
  if any(getattr(jax.config, name) != value for name, value in before.items()):
    from jax.experimental.compilation_cache import compilation_cache

    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
