"""PRNG key handling: one canonical key type and the fold-in conventions.

Every public function that takes a key accepts a new-style typed key
(``jax.random.key(0)``) or a legacy ``uint32[2]`` key (``jax.random.PRNGKey(0)``).
Keys are derived by *use* and by *position*, never by splitting a running key, so
that the key of any step is a pure function of the run's seed and the step
number: a resumed run draws exactly the numbers the uninterrupted run drew.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Stable integer tags for each use of randomness (fold_in takes integers).
# Changing a value changes every run's numbers, so they are fixed forever.
_USES = {"init": 0, "dropout": 1, "shuffle": 2, "augment": 3, "data": 4, "mc_dropout": 5,
        "input_noise": 6}


def as_key(key) -> jax.Array:
  """Returns ``key`` as a typed PRNG key, accepting legacy ``uint32[..., 2]`` keys.

  Args:
    key: a typed key (``jax.random.key``) or a legacy raw key
      (``jax.random.PRNGKey``), possibly batched.

  Returns:
    A typed key array with the same batch shape.

  >>> k = as_key(jax.random.PRNGKey(0))
  >>> bool(jnp.all(jax.random.key_data(k) == jax.random.key_data(jax.random.key(0))))
  True
  """
  if isinstance(key, jax.Array | np.ndarray) and jnp.issubdtype(
      key.dtype, jax.dtypes.prng_key
  ):
    return key
  key = jnp.asarray(key)
  if key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] != 2:
    raise ValueError(
        f"key must be a jax.random.key or a uint32[2] PRNGKey, got dtype "
        f"{key.dtype} and shape {key.shape}"
    )
  return jax.random.wrap_key_data(key)


def key_for(key, use: str, *positions) -> jax.Array:
  """Derives the key for one use of randomness at one position of the run.

  ``key_for(run_key, "dropout", step)`` is the dropout key of a global step and
  ``key_for(run_key, "shuffle", epoch)`` the shuffle key of an epoch. Positions
  may be traced integers, so this works inside ``jit`` and ``lax.scan``.

  Args:
    key: the run's base key.
    use: one of ``"init"``, ``"dropout"``, ``"shuffle"``, ``"augment"``, ``"data"``.
    *positions: integers folded in order (for example the epoch, or the step).

  Returns:
    A typed key.

  >>> a = key_for(jax.random.key(0), "dropout", 3)
  >>> b = key_for(jax.random.key(0), "dropout", 4)
  >>> bool(jnp.any(jax.random.key_data(a) != jax.random.key_data(b)))
  True
  """
  if use not in _USES:
    raise ValueError(f"use must be one of {sorted(_USES)}, got {use!r}")
  key = jax.random.fold_in(as_key(key), _USES[use])
  for position in positions:
    key = jax.random.fold_in(key, position)
  return key
