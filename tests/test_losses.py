"""Tests for jaxtrain.losses: formulas, stability, shapes and PyTorch parity."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import losses
from jaxtrain.core.losses import LOSSES, get_loss

# The value tests call jitted losses: one compilation per shape is much faster
# than eager op-by-op dispatch (the shape checks run at trace time either way).
cross_entropy = jax.jit(losses.cross_entropy)
binary_cross_entropy_with_logits = jax.jit(losses.binary_cross_entropy_with_logits)
mse = jax.jit(losses.mse)
hinge = jax.jit(losses.hinge)
JITTED = {name: jax.jit(fn) for name, fn in LOSSES.items()}


def grad_of_sum(loss_fn, outputs, targets):
  """d sum(loss) / d outputs, jitted."""
  return jax.jit(jax.grad(lambda o: loss_fn(o, targets).sum()))(
      jnp.asarray(outputs, jnp.float32)
  )


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------------------
# Formulas on hand-written numbers (expected values in float64 numpy).


def test_cross_entropy_formula():
  logits = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [-2.0, 0.5, 0.0]])
  labels = np.array([2, 0, 1])
  # -log softmax(z)[y] = log(sum(exp(z))) - z[y]
  expected = [np.log(np.sum(np.exp(z))) - z[y] for z, y in zip(logits, labels)]
  np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)
  np.testing.assert_allclose(cross_entropy(logits, labels)[1], np.log(3.0), rtol=1e-6)


def test_binary_cross_entropy_formula():
  x = np.array([0.5, -1.5, 2.0, 0.0, 3.0])
  t = np.array([1.0, 0.0, 0.25, 1.0, 0.0])
  expected = -(t * np.log(sigmoid(x)) + (1 - t) * np.log(1 - sigmoid(x)))
  np.testing.assert_allclose(
      binary_cross_entropy_with_logits(x, t), expected, rtol=1e-6
  )


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.float32])
def test_binary_cross_entropy_casts_targets(dtype):
  x, t = np.array([0.5, -1.5, 2.0]), np.array([1, 0, 1])
  expected = binary_cross_entropy_with_logits(x, t.astype(np.float32))
  got = binary_cross_entropy_with_logits(x, t.astype(dtype))
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, expected)


def test_mse_formula():
  outputs = np.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 4.0]])
  targets = np.array([[1.5, 0.0, 0.0], [1.0, 0.5, 1.0]])
  expected = np.mean((outputs - targets) ** 2, axis=1)  # [0.25+4+0, 4+0+9] / 3
  np.testing.assert_allclose(mse(outputs, targets), expected, rtol=1e-6)
  np.testing.assert_allclose(expected, [4.25 / 3, 13 / 3])


def test_binary_hinge_formula_and_target_encodings():
  x = np.array([0.5, -2.0, 3.0, 0.0, -0.25])
  y = np.array([1.0, -1.0, -1.0, 1.0, 1.0])
  expected = np.maximum(0, 1 - y * x)  # [0.5, 0, 4, 1, 1.25]
  np.testing.assert_allclose(hinge(x, y), expected, rtol=1e-6)
  # 0/1 targets mean the same as -1/+1 (t <= 0 -> -1).
  np.testing.assert_array_equal(hinge(x, (y > 0).astype(np.int32)), hinge(x, y))
  np.testing.assert_array_equal(hinge(x, y > 0), hinge(x, y))


def test_multiclass_hinge_formula():
  x = np.array([[0.1, 0.2, 0.4, 0.8], [2.0, -1.0, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])
  y = np.array([3, 0, 2])
  num_classes = x.shape[1]
  expected = [
      sum(max(0.0, 1 - row[label] + row[i]) for i in range(num_classes) if i != label)
      / num_classes
      for row, label in zip(x, y)
  ]
  np.testing.assert_allclose(hinge(x, y), expected, rtol=1e-6)
  np.testing.assert_allclose(expected, [0.325, (0 + 0 + 0.5) / 4, 0.75])


# ---------------------------------------------------------------------------
# Stability at logits of +-100: finite values and gradients, and correct.

LOSS_NAMES = sorted(LOSSES)


def extreme_case(name):
  """Outputs with +-100 entries and targets, for each loss."""
  if name == "cross_entropy":
    return np.array([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0]]), np.array([1, 2])
  if name == "hinge":
    return np.array([[100.0, -100.0], [-100.0, 100.0]]), np.array([1, 1])
  return np.array([100.0, -100.0, 100.0, -100.0]), np.array([0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_extreme_logits_give_finite_values_and_gradients(name):
  outputs, targets = extreme_case(name)
  values = JITTED[name](outputs, targets)
  grads = grad_of_sum(LOSSES[name], outputs, targets)
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
  assert values.shape == (outputs.shape[0],)


def test_extreme_logits_values_are_correct():
  ce = cross_entropy(
      np.array([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0]]), np.array([1, 2])
  )
  np.testing.assert_allclose(ce, [200.0, np.log(2.0)], rtol=1e-6)
  bce = binary_cross_entropy_with_logits(
      np.array([100.0, -100.0, 100.0, -100.0]), np.array([0.0, 1.0, 1.0, 0.0])
  )
  np.testing.assert_allclose(bce, [100.0, 100.0, 0.0, 0.0], rtol=1e-6, atol=1e-30)
  bce_grad = grad_of_sum(
      losses.binary_cross_entropy_with_logits, [100.0, -100.0], jnp.array([0.0, 1.0])
  )
  np.testing.assert_allclose(bce_grad, [1.0, -1.0])  # sigmoid(x) - t
  ce_grad = grad_of_sum(losses.cross_entropy, [[100.0, -100.0]], jnp.array([1]))
  np.testing.assert_allclose(ce_grad, [[1.0, -1.0]])  # softmax(x) - onehot
  np.testing.assert_allclose(
      hinge(np.array([100.0, -100.0]), np.array([0, 0])), [101.0, 0.0]
  )


def test_bce_gradient_at_zero_is_sigmoid_minus_target():
  # The max/abs kinks of the stable form meet at 0; the gradient must still
  # be sigmoid(0) - t.
  grad = grad_of_sum(
      losses.binary_cross_entropy_with_logits, [0.0, 0.0], jnp.array([1.0, 0.0])
  )
  np.testing.assert_allclose(grad, [-0.5, 0.5])


# ---------------------------------------------------------------------------
# Shapes: [batch] output, trailing-axis averaging, the [B, 1] squeeze.


def sample(name, shape, seed=0):
  """Outputs and targets for ``name`` with targets of ``shape``."""
  rng = np.random.default_rng(seed)
  if name in ("cross_entropy", "hinge"):
    outputs = rng.normal(size=shape + (5,)).astype(np.float32)
    return outputs, rng.integers(0, 5, size=shape)
  outputs = rng.normal(size=shape).astype(np.float32)
  return outputs, rng.integers(0, 2, size=shape).astype(np.float32)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_returns_one_loss_per_example(name):
  outputs, targets = sample(name, (7,))
  assert JITTED[name](outputs, targets).shape == (7,)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_trailing_axes_are_averaged(name):
  outputs, targets = sample(name, (3, 4, 2))
  got = JITTED[name](outputs, targets)
  assert got.shape == (3,)
  # Same numbers as treating every trailing position as its own example.
  flat = JITTED[name](outputs.reshape((24,) + outputs.shape[3:]), targets.reshape(24))
  np.testing.assert_allclose(got, flat.reshape(3, 8).mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("name", ["bce", "mse", "hinge"])
def test_single_logit_column_is_squeezed(name):
  rng = np.random.default_rng(1)
  outputs = rng.normal(size=(6, 1)).astype(np.float32)
  targets = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], np.float32)
  got = JITTED[name](outputs, targets)
  # Not the [6, 6] matrix that broadcasting [6, 1] against [6] would give.
  assert got.shape == (6,)
  np.testing.assert_array_equal(got, JITTED[name](outputs[:, 0], targets))


def test_squeeze_also_for_trailing_axes():
  outputs, targets = np.ones((2, 3, 1)), np.zeros((2, 3))
  np.testing.assert_allclose(mse(outputs, targets), [1.0, 1.0])


MISMATCHES = [
    ("mse", (8, 10), (8, 3)),
    ("mse", (8,), (8, 1)),  # only outputs get squeezed, never the targets
    ("mse", (8, 2), (8,)),
    ("bce", (4, 1), (5,)),
    ("bce", (4,), (5,)),
    ("hinge", (8, 10), (8, 3)),
    ("hinge", (8, 10), (7,)),
    ("cross_entropy", (8, 10), (8, 3)),
    ("cross_entropy", (8, 10), (7,)),
    ("cross_entropy", (8, 10), (8, 10)),
    ("cross_entropy", (8, 4, 10), (8,)),
]


@pytest.mark.parametrize("name,out_shape,target_shape", MISMATCHES)
def test_mismatched_shapes_raise_with_both_shapes(name, out_shape, target_shape):
  outputs = np.zeros(out_shape, np.float32)
  targets = np.zeros(target_shape, np.int32)
  message = f"targets of shape {target_shape} do not fit outputs of shape {out_shape}"
  with pytest.raises(ValueError, match=re.escape(message)):
    LOSSES[name](outputs, targets)


def test_shape_checks_run_at_trace_time_under_jit():
  with pytest.raises(
      ValueError, match=re.escape("(8, 3) do not fit outputs of shape (8, 10)")
  ):
    mse(jnp.zeros((8, 10)), jnp.zeros((8, 3)))
  np.testing.assert_allclose(mse(jnp.ones((4, 1)), jnp.zeros(4)), np.ones(4))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_batch_axis_raises(name):
  with pytest.raises(
      ValueError, match=re.escape("outputs must have a batch axis, got shape ()")
  ):
    LOSSES[name](np.float32(1.0), np.int32(1))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_squeezing_to_no_batch_axis_raises(name):
  # A lone [C] logit vector, or a single [1] logit, has no batch axis.
  outputs = np.zeros(3 if name in ("cross_entropy", "hinge") else 1, np.float32)
  with pytest.raises(ValueError, match="outputs must have a batch axis"):
    LOSSES[name](outputs, np.int32(0))


@pytest.mark.parametrize("loss_fn,arg", [(cross_entropy, "labels"), (hinge, "targets")])
def test_class_losses_need_integer_labels(loss_fn, arg):
  message = f"{arg} must be integer class labels, got dtype float32"
  with pytest.raises(ValueError, match=re.escape(message)):
    loss_fn(np.zeros((4, 3), np.float32), np.zeros(4, np.float32))


def test_get_loss_and_registry():
  assert get_loss("cross_entropy") is losses.cross_entropy
  assert get_loss("bce") is losses.binary_cross_entropy_with_logits
  assert get_loss("mse") is losses.mse and get_loss("hinge") is losses.hinge
  with pytest.raises(
      ValueError, match=re.escape("name must be one of ['bce', 'cross_entropy'")
  ):
    get_loss("focal")
  with pytest.raises(TypeError):
    LOSSES["focal"] = mse  # read-only


# ---------------------------------------------------------------------------
# PyTorch parity, recorded from torch 2.13.0 (CPU, float32) with the exact calls
# in the comments; the torch inputs were these same arrays.

CE_LOGITS = np.array(
    [[100.0, -100.0, 0.0], [-100.0, 100.0, 50.0], [0.5, -1.25, 2.0], [3.0, 3.0, -3.0]],
    np.float32,
)
CE_LABELS = np.array([1, 1, 0, 2])
# l = torch.nn.CrossEntropyLoss(reduction="none")(x, y); l.sum().backward()
TORCH_CE = [200.0, -0.0, 1.732622, 6.694386]
TORCH_CE_GRAD = [
    [1.0, -1.0, 3.7835059e-44],
    [0.0, 0.0, 1.9287499e-22],
    [-8.2317984e-01, 3.0726742e-02, 7.9245305e-01],
    [4.9938107e-01, 4.9938107e-01, -9.9876213e-01],
]

SEQ_LOGITS = np.linspace(-3.0, 3.0, 24).reshape(2, 3, 4).astype(np.float32)
SEQ_LABELS = np.array([[0, 3, 1], [2, 2, 0]])
# torch puts classes second:
# torch.nn.CrossEntropyLoss(reduction="none")(x.permute(0, 2, 1), y).mean(1)
TORCH_CE_SEQ = [1.4719025, 1.4719027]

BCE_LOGITS = np.array([100.0, -100.0, 0.0, 2.5, -0.75, 100.0, -100.0], np.float32)
BCE_TARGETS = np.array([0.0, 1.0, 1.0, 0.3, 0.0, 1.0, 0.0], np.float32)
# l = torch.nn.BCEWithLogitsLoss(reduction="none")(x, t); l.sum().backward()
TORCH_BCE = [100.0, 100.0, 0.69314718, 1.8288897, 0.38687098, 3.9236357e-44, 0.0]
TORCH_BCE_GRAD = [1.0, -1.0, -0.5, 0.6241418, 0.3208213, 0.0, 0.0]

MSE_OUTPUTS = np.array([[1.5, -2.0], [0.25, 100.0]], np.float32)
MSE_TARGETS = np.array([[1.0, 0.5], [-0.25, -100.0]], np.float32)
# torch.nn.MSELoss(reduction="none")(x, t).mean(1)
TORCH_MSE = [3.25, 20000.125]

MM_LOGITS = np.array(
    [[100.0, -100.0, 0.0, 1.0], [0.1, 0.2, 0.4, 0.8], [-100.0, 100.0, 3.0, -2.0]],
    np.float32,
)
MM_LABELS = np.array([0, 3, 0])
# l = torch.nn.MultiMarginLoss(reduction="none")(x, y); l.sum().backward()
TORCH_MULTI_MARGIN = [0.0, 0.325, 101.0]
TORCH_MULTI_MARGIN_GRAD = [
    [0.0, 0.0, 0.0, 0.0],
    [0.25, 0.25, 0.25, -0.75],
    [-0.75, 0.25, 0.25, 0.25],
]

HINGE_OUTPUTS = np.array([100.0, -100.0, 0.5, -0.5, 2.0, 0.0], np.float32)
HINGE_TARGETS = np.array([0, 0, 1, 1, 1, 0])
# torch has no binary hinge loss; with two classes scored (-x/2, x/2) the
# multi-margin loss is max(0, 1 - y * x) / 2, so:
# 2 * torch.nn.MultiMarginLoss(reduction="none")(
#     torch.stack([-x / 2, x / 2], 1), torch.tensor(t > 0).long())
TORCH_BINARY_HINGE = [101.0, 0.0, 0.5, 1.5, 0.0, 1.0]

# Values below ~1e-38 are float32 denormals (torch keeps them, XLA on CPU may
# flush them to zero), hence the tiny atol.
PARITY = [
    ("cross_entropy", cross_entropy, CE_LOGITS, CE_LABELS, TORCH_CE, TORCH_CE_GRAD),
    ("cross_entropy_seq", cross_entropy, SEQ_LOGITS, SEQ_LABELS, TORCH_CE_SEQ, None),
    (
        "bce",
        binary_cross_entropy_with_logits,
        BCE_LOGITS,
        BCE_TARGETS,
        TORCH_BCE,
        TORCH_BCE_GRAD,
    ),
    ("mse", mse, MSE_OUTPUTS, MSE_TARGETS, TORCH_MSE, None),
    (
        "multi_margin",
        hinge,
        MM_LOGITS,
        MM_LABELS,
        TORCH_MULTI_MARGIN,
        TORCH_MULTI_MARGIN_GRAD,
    ),
    ("binary_hinge", hinge, HINGE_OUTPUTS, HINGE_TARGETS, TORCH_BINARY_HINGE, None),
]


@pytest.mark.parametrize(
    "loss_fn,outputs,targets,values,grads",
    [p[1:] for p in PARITY],
    ids=[p[0] for p in PARITY],
)
def test_matches_torch(loss_fn, outputs, targets, values, grads):
  np.testing.assert_allclose(loss_fn(outputs, targets), values, rtol=1e-6, atol=1e-30)
  if grads is not None:
    got = grad_of_sum(loss_fn, outputs, targets)
    np.testing.assert_allclose(got, grads, rtol=1e-6, atol=1e-30)
