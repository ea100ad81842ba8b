"""Data: mini-batches in a seeded order (:mod:`~jaxtrain.data.batching`), the
loaders that give arrays (:mod:`~jaxtrain.data.sources`, MNIST, tfds) and the
random-access sources read by index for data bigger than memory
(:mod:`~jaxtrain.data.indexed`: memmapped ``.npy``, tfds array_record, Grain).

``jaxtrain.data`` (also reachable as ``jaxtrain.datasets``) re-exports both:

>>> import jax, jaxtrain
>>> ds = jaxtrain.data.load("two_moons", key=jax.random.key(0), n_samples=100)
>>> [b["inputs"].shape for b in jaxtrain.data.batches(ds.train, 32)]
[(32, 2), (32, 2)]
"""

from jaxtrain.data.arrays import Arrays, DataError, check_length, gather_rows
from jaxtrain.data.batching import (
                                   batches,
                                   check_arrays,
                                   epoch_indices,
                                   num_batches,
                                   permutation,
)
from jaxtrain.data.indexed import (
                                   ArraySource,
                                   NpyFile,
                                   RecordSource,
                                   Source,
                                   as_source,
                                   head,
                                   length,
                                   npy_source,
                                   tfds_source,
                                   write_npy,
)
from jaxtrain.data.mnist import IDX_FILES, load_mnist, load_mnist_idx, read_idx
from jaxtrain.data.sources import (
                                   DEFAULT_FRACTIONS,
                                   NUM_CLASSES,
                                   Dataset,
                                   load,
                                   normalize_images,
                                   split,
                                   standardize,
                                   take,
                                   two_moons,
)
from jaxtrain.data.tfds import TFDS_IMAGE_SHAPES, load_tfds

__all__ = [
    "DEFAULT_FRACTIONS", "IDX_FILES", "NUM_CLASSES", "TFDS_IMAGE_SHAPES", "ArraySource",
    "Arrays", "DataError", "Dataset", "NpyFile", "RecordSource", "Source", "as_source", "batches",
    "check_arrays", "check_length", "epoch_indices", "gather_rows", "head", "length", "load",
    "load_mnist", "load_mnist_idx", "load_tfds", "normalize_images", "npy_source",
    "num_batches", "permutation", "read_idx", "split", "standardize", "take", "tfds_source",
    "two_moons", "write_npy",
]
