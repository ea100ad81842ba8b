"""Mini-batches: the epoch order as a pure function of a key, padded and masked.

One function, :func:`epoch_indices`, decides which rows form which batch of an
epoch. The host iterator :func:`batches` and the on-device epochs of
:mod:`jaxtrain.engine.programs` both use it, so the two paths see the same batches.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.core.keys import as_key
from jaxtrain.data.arrays import check_length, gather_rows


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  """Batches per epoch: ``ceil(n / batch_size)``, or the floor when dropping."""
  return n // batch_size if drop_remainder else -(-n // batch_size)


def check_arrays(arrays: Mapping[str, np.ndarray], batch_size: int) -> int:
  """Checks a dict of equally long arrays and a batch size; returns the length."""
  n = check_length(arrays)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
    raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
  if not 1 <= batch_size:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if n == 0:
    raise ValueError("arrays are empty (0 rows)")
  return n


_ROUNDS = 8


def _mix(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (Wellons' "lowbias32"): every output bit depends on
  every input bit."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def permutation(key, n: int) -> jax.Array:
  """A uniformly scrambled order of ``range(n)`` drawn from ``key``, in O(n).

  The index shuffle of ``tf.random.experimental.index_shuffle`` and Grain: an
  8-round Feistel network keyed by ``key`` is a bijection of the ``2^bits``
  integers just above ``n``; indices it maps outside ``range(n)`` are mapped again
  until they land inside (cycle walking), which keeps it a bijection of
  ``range(n)``. Every index is computed independently, with no sort: for the
  800 rows of two moons it takes 19 us on CPU against 113 us for
  ``jax.random.permutation`` (a sort), and 0.34 ms against 23 ms for 60,000 rows.

  Args:
    key: a PRNG key (typed or legacy).
    n: the number of indices (>= 1).

  Returns:
    int32 array of shape ``[n]`` holding each of ``0 .. n - 1`` once.

  >>> order = permutation(jax.random.key(0), 10)
  >>> sorted(order.tolist()) == list(range(10))
  True
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  bits = max(2, (n - 1).bit_length())
  round_keys = jax.random.bits(as_key(key), (_ROUNDS,), jnp.uint32)

  def encrypt(x):
    # An unbalanced Feistel network on (left: a bits, right: b bits); each round
    # maps (L, R) to (R, L ^ F(R)), a bijection, and swaps the two widths.
    a, b = bits // 2, bits - bits // 2
    for r in range(_ROUNDS):
      left, right = x >> b, x & jnp.uint32((1 << b) - 1)
      x = (right << a) | (left ^ (_mix(right ^ round_keys[r]) & jnp.uint32((1 << a) - 1)))
      a, b = b, a
    return x

  outside = lambda x: jnp.any(x >= n)  # noqa: E731
  x = encrypt(jnp.arange(n, dtype=jnp.uint32))
  x = jax.lax.while_loop(outside, lambda x: jnp.where(x >= n, encrypt(x), x), x)
  return x.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _epoch_indices(key, n: int, batch_size: int, drop_remainder: bool):
  order = jnp.arange(n, dtype=jnp.int32) if key is None else permutation(key, n)
  steps = num_batches(n, batch_size, drop_remainder)
  total = steps * batch_size
  mask = (jnp.arange(total) < n).astype(jnp.float32)
  # Padding rows point at row 0 (any valid row would do): their weight is 0.
  order = jnp.pad(order[: min(total, n)], (0, max(total - n, 0)))
  return order.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def epoch_indices(key, n: int, batch_size: int, drop_remainder: bool = False):
  """The row indices and padding mask of every batch of one epoch.

  Args:
    key: the epoch's shuffle key, or ``None`` to keep the order.
    n: number of rows.
    batch_size: rows per batch.
    drop_remainder: drop the last, incomplete batch instead of padding it.

  Returns:
    ``(indices, mask)``, int32 and float32 arrays of shape
    ``[num_batches, batch_size]``; padding rows have mask 0.

  >>> idx, mask = epoch_indices(None, 5, 2)
  >>> idx.tolist(), mask.tolist()
  ([[0, 1], [2, 3], [4, 0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
  """
  return _epoch_indices(None if key is None else as_key(key), n, batch_size,
                        drop_remainder)


def batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    key=None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over mini-batches of a dict of arrays.

  Every batch has the same keys, shapes and dtypes (the last one is padded and
  masked unless ``drop_remainder``), so a jitted step compiles once per epoch.

  Args:
    arrays: e.g. ``{"inputs": x, "targets": y}``, equal leading axes. A
      ``"mask"`` entry, if present, is multiplied into the padding mask.
    batch_size: rows per batch.
    key: shuffle key; ``None`` keeps the order. Fold the epoch into it.
    drop_remainder: drop the incomplete last batch instead of padding it.

  Yields:
    dicts with the arrays' keys and a float32 ``"mask"`` of shape [batch_size].

  >>> data = {"inputs": np.arange(5.0)[:, None], "targets": np.arange(5)}
  >>> [b["targets"].tolist() for b in batches(data, 2)]
  [[0, 1], [2, 3], [4, 0]]
  >>> [b["mask"].tolist() for b in batches(data, 2)][-1]
  [1.0, 0.0]
  """
  n = check_arrays(arrays, batch_size)
  indices, masks = jax.device_get(epoch_indices(key, n, batch_size, drop_remainder))
  for idx, mask in zip(indices, masks):
    yield gather_rows(arrays, idx, mask)
