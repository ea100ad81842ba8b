"""data.batches: order, padding, masks, shapes."""

import jax
import numpy as np
import pytest

from jaxtrain import data


def arrays(n=10):
  return {"inputs": np.arange(n * 2, dtype=np.float32).reshape(n, 2),
          "targets": np.arange(n, dtype=np.int32)}


def test_no_key_keeps_order_and_pads_last_batch():
  out = list(data.batches(arrays(), 4))
  assert [b["targets"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
  assert out[-1]["mask"].tolist() == [1, 1, 0, 0]
  assert all(b["mask"].dtype == np.float32 for b in out)
  assert {(k, v.shape, v.dtype) for k, v in out[0].items()} == {
      (k, v.shape, v.dtype) for k, v in out[-1].items()}


def test_drop_remainder():
  out = list(data.batches(arrays(), 4, drop_remainder=True))
  assert len(out) == 2 and all(b["mask"].sum() == 4 for b in out)


def test_key_gives_a_permutation_drawn_from_it():
  first = np.concatenate([b["targets"] for b in data.batches(arrays(), 3, key=jax.random.key(1))])
  again = np.concatenate([b["targets"] for b in data.batches(arrays(), 3, key=jax.random.PRNGKey(1))])
  other = np.concatenate([b["targets"] for b in data.batches(arrays(), 3, key=jax.random.key(2))])
  mask = np.concatenate([b["mask"] for b in data.batches(arrays(), 3, key=jax.random.key(1))])
  assert sorted(first[mask > 0].tolist()) == list(range(10))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  perm = np.asarray(data.permutation(jax.random.key(1), 10))
  np.testing.assert_array_equal(first[:10], perm)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 800, 1023, 1024, 1025, 60_000])
def test_permutation_is_a_bijection_for_every_size(n):
  for seed in range(3):
    order = np.asarray(data.permutation(jax.random.key(seed), n))
    assert order.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_permutation_is_uniform():
  # 6000 draws of an order of 6 rows: every row lands in every position about
  # 1000 times, and every one of the 720 orders shows up (chi-square-sized bounds).
  draw = jax.jit(jax.vmap(lambda k: data.permutation(k, 6)))
  orders = np.asarray(draw(jax.random.split(jax.random.key(0), 6000)))
  counts = np.stack([(orders == row).sum(axis=0) for row in range(6)])
  chi2 = ((counts - 1000.0) ** 2 / 1000.0).sum()
  assert chi2 < 60, counts  # 25 degrees of freedom: p < 1e-4 at 60
  distinct = {tuple(o) for o in orders.tolist()}
  assert len(distinct) == 720
  # Consecutive epochs (folded keys) are unrelated: rows keep their position
  # 1/n of the time, not more.
  a = np.asarray(data.permutation(jax.random.fold_in(jax.random.key(0), 1), 1000))
  b = np.asarray(data.permutation(jax.random.fold_in(jax.random.key(0), 2), 1000))
  assert (a == b).sum() < 10


def test_permutation_rejects_empty():
  with pytest.raises(ValueError, match="n must be >= 1, got 0"):
    data.permutation(jax.random.key(0), 0)


def test_inputs_follow_targets():
  for b in data.batches(arrays(), 3, key=jax.random.key(0)):
    np.testing.assert_array_equal(b["inputs"][:, 0], b["targets"] * 2)


def test_user_mask_is_multiplied_in():
  a = {**arrays(4), "mask": np.array([1, 0, 1, 1], np.float32)}
  out = list(data.batches(a, 3))
  assert [b["mask"].tolist() for b in out] == [[1, 0, 1], [1, 0, 0]]


@pytest.mark.parametrize("batch_size, message", [(0, "batch_size must be >= 1, got 0"),
                                                  (2.5, "batch_size must be an integer")])
def test_bad_batch_size(batch_size, message):
  with pytest.raises(ValueError, match=message):
    list(data.batches(arrays(), batch_size))


def test_unequal_lengths():
  with pytest.raises(ValueError, match="leading axis"):
    list(data.batches({"inputs": np.zeros((3, 2)), "targets": np.zeros(4)}, 2))
