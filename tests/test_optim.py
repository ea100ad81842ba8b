"""Tests for jaxtrain.optim: PyTorch-equal SGD / Adam / AdamW.

Expected values come from the update rules written out in numpy (float64) and
from reference numbers recorded from PyTorch, never from optax itself.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain.core.optim import (
    OPTIMIZERS,
    clip_by_global_norm_torch,
    current_learning_rate,
    make_optimizer,
    no_bias_norm_mask,
)

# A small parameter pytree and three hand-chosen gradients.
P0 = {"w": np.array([[0.5, -1.0], [1.5, 2.0]]), "b": np.array([0.1, -0.2])}
G = [
    {"w": np.array([[0.1, -0.2], [0.3, 0.4]]), "b": np.array([0.5, -0.5])},
    {"w": np.array([[-0.3, 0.1], [0.2, -0.1]]), "b": np.array([0.25, 0.0])},
    {"w": np.array([[0.2, 0.2], [-0.4, 0.1]]), "b": np.array([-0.5, 1.0])},
]


def f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def run(tx, grads, params=P0, jit=True):
  """Applies ``tx`` to a sequence of gradients; returns params after each step."""
  params, history = f32(params), []
  # One compilation is faster than dispatching every op eagerly.
  opt_state = (jax.jit(tx.init) if jit else tx.init)(params)
  update = jax.jit(tx.update) if jit else tx.update
  for g in grads:
    updates, opt_state = update(f32(g), opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def assert_steps(history, expected, rtol=1e-6, atol=1e-7):
  assert len(history) == len(expected)
  for step, (got, want) in enumerate(zip(history, expected), start=1):
    for leaf in want:
      np.testing.assert_allclose(
          got[leaf], want[leaf], rtol=rtol, atol=atol, err_msg=f"step {step}, {leaf}"
      )


def leafwise(fn, *trees):
  return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


# ---------------------------------------------------------------------------
# The first three updates, derived by hand.


def test_sgd_plain():
  lr = 0.1
  p1 = leafwise(lambda p, g: p - lr * g, P0, G[0])
  p2 = leafwise(lambda p, g: p - lr * g, p1, G[1])
  p3 = leafwise(lambda p, g: p - lr * g, p2, G[2])
  assert_steps(run(make_optimizer("sgd", lr), G), [p1, p2, p3])


def test_sgd_momentum():
  lr, mu = 0.1, 0.9
  # torch: the buffer starts as the first gradient (not mu * 0 + g, same thing).
  b1 = G[0]
  b2 = leafwise(lambda b, g: mu * b + g, b1, G[1])
  b3 = leafwise(lambda b, g: mu * b + g, b2, G[2])
  p1 = leafwise(lambda p, b: p - lr * b, P0, b1)
  p2 = leafwise(lambda p, b: p - lr * b, p1, b2)
  p3 = leafwise(lambda p, b: p - lr * b, p2, b3)
  assert_steps(run(make_optimizer("sgd", lr, momentum=mu), G), [p1, p2, p3])


def test_sgd_nesterov():
  lr, mu = 0.1, 0.9
  b1 = G[0]
  b2 = leafwise(lambda b, g: mu * b + g, b1, G[1])
  b3 = leafwise(lambda b, g: mu * b + g, b2, G[2])
  # Nesterov steps along g + mu * b.
  p1 = leafwise(lambda p, g, b: p - lr * (g + mu * b), P0, G[0], b1)
  p2 = leafwise(lambda p, g, b: p - lr * (g + mu * b), p1, G[1], b2)
  p3 = leafwise(lambda p, g, b: p - lr * (g + mu * b), p2, G[2], b3)
  tx = make_optimizer("sgd", lr, momentum=mu, nesterov=True)
  assert_steps(run(tx, G), [p1, p2, p3])


def test_sgd_coupled_weight_decay_enters_before_momentum():
  lr, mu, wd = 0.1, 0.9, 0.1
  d1 = leafwise(lambda g, p: g + wd * p, G[0], P0)  # L2 term added to the grad
  b1 = d1
  p1 = leafwise(lambda p, b: p - lr * b, P0, b1)
  d2 = leafwise(lambda g, p: g + wd * p, G[1], p1)
  b2 = leafwise(lambda b, d: mu * b + d, b1, d2)
  p2 = leafwise(lambda p, b: p - lr * b, p1, b2)
  d3 = leafwise(lambda g, p: g + wd * p, G[2], p2)
  b3 = leafwise(lambda b, d: mu * b + d, b2, d3)
  p3 = leafwise(lambda p, b: p - lr * b, p2, b3)
  tx = make_optimizer("sgd", lr, momentum=mu, weight_decay=wd)
  assert_steps(run(tx, G), [p1, p2, p3])


def adam_by_hand(lr, b1, b2, eps, wd=0.0, decoupled=False, mask=None):
  """Three Adam(W) steps, the formulas written out (torch.optim.Adam/AdamW)."""
  mask = mask or {k: 1.0 for k in P0}
  p = P0
  m = {k: np.zeros_like(v) for k, v in P0.items()}
  v = {k: np.zeros_like(x) for k, x in P0.items()}
  history = []
  for t, g in enumerate(G, start=1):
    if not decoupled:
      g = {k: g[k] + wd * mask[k] * p[k] for k in p}
    m = {k: b1 * m[k] + (1 - b1) * g[k] for k in p}
    v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in p}
    m_hat = {k: m[k] / (1 - b1**t) for k in p}
    v_hat = {k: v[k] / (1 - b2**t) for k in p}
    step = {k: m_hat[k] / (np.sqrt(v_hat[k]) + eps) for k in p}
    if decoupled:
      step = {k: step[k] + wd * mask[k] * p[k] for k in p}
    p = {k: p[k] - lr * step[k] for k in p}
    history.append(p)
  return history


def test_adam_bias_correction():
  lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-3
  # Step 1 of Adam is lr * g / (|g| + eps) thanks to the bias correction.
  expected = adam_by_hand(lr, b1, b2, eps)
  first = {k: P0[k] - lr * G[0][k] / (np.abs(G[0][k]) + eps) for k in P0}
  assert_steps(expected[:1], [first], rtol=1e-12)
  tx = make_optimizer("adam", lr, b1=b1, b2=b2, eps=eps)
  assert_steps(run(tx, G), expected)


def test_adam_bias_correction_with_default_betas():
  # b2 = 0.999: 1 - b2**t suffers cancellation in float32 if done naively.
  expected = adam_by_hand(0.01, 0.9, 0.999, 1e-8)
  assert_steps(run(make_optimizer("adam", 0.01), G), expected)


def test_adam_coupled_weight_decay():
  expected = adam_by_hand(0.01, 0.9, 0.999, 1e-8, wd=0.5)
  assert_steps(run(make_optimizer("adam", 0.01, weight_decay=0.5), G), expected)


def test_adamw_decoupled_weight_decay():
  expected = adam_by_hand(0.01, 0.9, 0.999, 1e-8, wd=0.5, decoupled=True)
  history = run(make_optimizer("adamw", 0.01, weight_decay=0.5), G)
  assert_steps(history, expected)
  # Decoupled != coupled: the same settings under "adam" give other numbers.
  coupled = run(make_optimizer("adam", 0.01, weight_decay=0.5), G)
  assert not np.allclose(coupled[-1]["w"], history[-1]["w"], rtol=1e-4)


def test_name_is_case_insensitive():
  expected = adam_by_hand(0.01, 0.9, 0.999, 1e-8, wd=0.5, decoupled=True)
  assert_steps(run(make_optimizer("AdamW", 0.01, weight_decay=0.5), G), expected)


# ---------------------------------------------------------------------------
# Gradient clipping (torch.nn.utils.clip_grad_norm_).


def torch_clip(g, max_norm):
  total = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
  return {k: x * min(1.0, max_norm / (total + 1e-6)) for k, x in g.items()}


def test_clipping_active_is_applied_before_weight_decay():
  lr, wd, max_norm = 0.1, 0.1, 0.3  # every G has norm > 0.3
  p, expected = P0, []
  for g in G:
    g = torch_clip(g, max_norm)
    p = {k: p[k] - lr * (g[k] + wd * p[k]) for k in p}
    expected.append(p)
  tx = make_optimizer("sgd", lr, weight_decay=wd, clip_norm=max_norm)
  assert_steps(run(tx, G), expected)


def test_clipping_inactive_is_a_bitwise_no_op():
  plain = run(make_optimizer("sgd", 0.1, momentum=0.9), G)
  clipped = run(make_optimizer("sgd", 0.1, momentum=0.9, clip_norm=100.0), G)
  for a, b in zip(plain, clipped):
    for leaf in a:
      np.testing.assert_array_equal(a[leaf], b[leaf])


def test_clip_includes_torchs_1e6():
  # Global norm exactly == max_norm: torch still scales by 5 / (5 + 1e-6);
  # optax.clip_by_global_norm would leave the gradient alone.
  grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  clip = clip_by_global_norm_torch(5.0)
  clipped, _ = jax.jit(clip.update)(grads, clip.init(grads))
  assert float(clipped["a"][0]) < 3.0 and float(clipped["b"][0]) < 4.0
  np.testing.assert_allclose(clipped["a"], 3.0 * 5 / (5 + 1e-6), rtol=1e-7)
  # From torch 2.13.0: g = torch.tensor([3.0, 4.0]) as p.grad, then
  # torch.nn.utils.clip_grad_norm_([p], max_norm=5.0) -> bit-identical here.
  np.testing.assert_array_equal(
      jnp.concatenate([clipped["a"], clipped["b"]]),
      np.array([2.9999993, 3.999999], np.float32),
  )
  optax_clipped, _ = jax.jit(optax.clip_by_global_norm(5.0).update)(
      grads, optax.EmptyState()
  )
  np.testing.assert_array_equal(optax_clipped["a"], grads["a"])


def test_clip_on_empty_tree():
  clip = clip_by_global_norm_torch(1.0)
  assert clip.update({}, clip.init({}))[0] == {}


# ---------------------------------------------------------------------------
# Weight-decay masks.


@pytest.mark.parametrize("mask", [no_bias_norm_mask, {"w": True, "b": False}])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_mask_excludes_biases(name, mask):
  expected = adam_by_hand(
      0.01,
      0.9,
      0.999,
      1e-8,
      wd=0.5,
      decoupled=name == "adamw",
      mask={"w": 1.0, "b": 0.0},
  )
  tx = make_optimizer(name, 0.01, weight_decay=0.5, weight_decay_mask=mask)
  assert_steps(run(tx, G), expected)


def test_sgd_mask_excludes_biases():
  lr, wd = 0.1, 0.5
  p, expected = P0, []
  for g in G:
    p = {"w": p["w"] - lr * (g["w"] + wd * p["w"]), "b": p["b"] - lr * g["b"]}
    expected.append(p)
  tx = make_optimizer("sgd", lr, weight_decay=wd, weight_decay_mask=no_bias_norm_mask)
  assert_steps(run(tx, G), expected)


def test_no_bias_norm_mask():
  params = {
      "Dense_0": {"kernel": np.ones((3, 4)), "bias": np.ones(4)},
      "LayerNorm_0": {"scale": np.ones(4), "bias": np.ones(4)},
      "Embed_0": {"embedding": np.ones((10, 4))},
      "odd": {"bias": np.ones((2, 2)), "scale": np.ones((2, 2)), "alpha": np.ones(())},
  }
  assert no_bias_norm_mask(params) == {
      "Dense_0": {"kernel": True, "bias": False},
      "LayerNorm_0": {"scale": False, "bias": False},
      "Embed_0": {"embedding": True},
      "odd": {"bias": False, "scale": False, "alpha": False},
  }


def test_no_bias_norm_mask_on_nnx_state():
  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

  # eval_shape: shapes are all the mask needs (it also works on abstract params).
  shapes = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0))), nnx.Param)
  mask = nnx.to_pure_dict(no_bias_norm_mask(shapes))
  assert mask == {
      "linear": {"kernel": True, "bias": False},
      "norm": {"scale": False, "bias": False},
  }
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)
  tx = make_optimizer(
      "adamw", 0.1, weight_decay=0.1, weight_decay_mask=no_bias_norm_mask
  )
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  updates = nnx.to_pure_dict(updates)
  # Zero gradients: only the decay moves anything, and only the kernel decays.
  np.testing.assert_allclose(updates["linear"]["kernel"], -0.1 * 0.1 * 2.0, rtol=1e-6)
  assert not np.any(updates["linear"]["bias"]) and not np.any(updates["norm"]["scale"])


# ---------------------------------------------------------------------------
# Schedules and the injected hyperparameters.


def test_schedule_changes_lr_per_step_and_is_reported():
  schedule = lambda step: 0.1 * 0.5**step  # noqa: E731
  tx = make_optimizer("sgd", schedule)
  params = f32(P0)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  # Before any update: the lr the first update will use.
  np.testing.assert_allclose(current_learning_rate(opt_state), 0.1)
  p = P0
  for k, g in enumerate(G):
    updates, opt_state = update(f32(g), opt_state, params)
    params = optax.apply_updates(params, updates)
    p = {leaf: p[leaf] - schedule(k) * g[leaf] for leaf in p}
    for leaf in p:
      np.testing.assert_allclose(params[leaf], p[leaf], rtol=1e-6)
    # After update k: the lr that update used.
    np.testing.assert_allclose(current_learning_rate(opt_state), schedule(k), rtol=1e-7)


def test_optax_schedule_with_adamw():
  schedule = optax.linear_schedule(0.01, 0.001, transition_steps=2)
  history = run(make_optimizer("adamw", schedule, weight_decay=0.5), G)
  # Per-step lr 0.01, 0.0055, 0.001 into the hand-written AdamW.
  p, m, v = P0, {k: 0.0 for k in P0}, {k: 0.0 for k in P0}
  for t, (g, lr) in enumerate(zip(G, [0.01, 0.0055, 0.001]), start=1):
    m = {k: 0.9 * m[k] + 0.1 * g[k] for k in p}
    v = {k: 0.999 * v[k] + 0.001 * g[k] ** 2 for k in p}
    step = {
        k: (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8) for k in p
    }
    p = {k: p[k] - lr * (step[k] + 0.5 * p[k]) for k in p}
  for leaf in p:
    np.testing.assert_allclose(history[-1][leaf], p[leaf], rtol=1e-6)


def test_hyperparams_live_in_the_state():
  tx = make_optimizer("adamw", 3e-4, weight_decay=0.01)
  opt_state = tx.init(f32(P0))
  assert set(opt_state.hyperparams) == {"learning_rate", "weight_decay"}
  assert isinstance(opt_state.hyperparams["learning_rate"], jax.Array)
  np.testing.assert_allclose(opt_state.hyperparams["weight_decay"], 0.01)
  np.testing.assert_allclose(current_learning_rate(opt_state), 3e-4)
  # Overwriting the injected value changes the next update.
  opt_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  updates, _ = jax.jit(tx.update)(f32(G[0]), opt_state, f32(P0))
  assert not any(np.any(u) for u in jax.tree.leaves(updates))


def test_vmap_over_learning_rates():
  tx = make_optimizer("sgd", 0.1, momentum=0.9)
  params, grads = f32(P0), f32(G[0])
  lrs = jnp.array([0.1, 0.01, 0.001])

  def init(lr):
    opt_state = tx.init(params)
    opt_state.hyperparams["learning_rate"] = lr
    return opt_state

  opt_states = jax.vmap(init)(lrs)
  update = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))
  updates, opt_states = update(grads, opt_states, params)
  np.testing.assert_allclose(current_learning_rate(opt_states), lrs)
  for i, lr in enumerate([0.1, 0.01, 0.001]):
    np.testing.assert_allclose(updates["w"][i], -lr * G[0]["w"], rtol=1e-6)


def test_current_learning_rate_finds_nested_state():
  tx = optax.MultiSteps(make_optimizer("sgd", 0.3), every_k_schedule=2)
  np.testing.assert_allclose(current_learning_rate(tx.init(f32(P0))), 0.3)


def test_current_learning_rate_without_injected_lr():
  with pytest.raises(ValueError, match="opt_state holds no injected 'learning_rate'"):
    current_learning_rate(optax.sgd(0.1).init(f32(P0)))


def test_update_requires_params():
  tx = make_optimizer("sgd", 0.1)
  with pytest.raises(ValueError, match="params must be passed to update"):
    tx.update(f32(G[0]), tx.init(f32(P0)))


# ---------------------------------------------------------------------------
# jit.

JIT_CONFIGS = [
    ("sgd", dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", dict(learning_rate=0.01, weight_decay=0.1, clip_norm=0.5)),
    (
        "adamw",
        dict(
            learning_rate=optax.cosine_decay_schedule(0.01, 10),
            weight_decay=0.1,
            weight_decay_mask=no_bias_norm_mask,
        ),
    ),
]


@pytest.mark.parametrize("name,kwargs", JIT_CONFIGS, ids=[c[0] for c in JIT_CONFIGS])
def test_update_under_jit_matches_eager(name, kwargs):
  tx = make_optimizer(name, **kwargs)
  eager = run(tx, G, jit=False)
  jitted = run(tx, G, jit=True)
  for a, b in zip(eager, jitted):
    for leaf in a:
      np.testing.assert_allclose(a[leaf], b[leaf], rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# Convergence on a convex problem with a known optimum.

A = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.5, 0.0, 1.0], [1.0, 1.0, 1.0]])
Y = np.array([1.0, -2.0, 0.5, 3.0])
LSTSQ = np.linalg.solve(A.T @ A, A.T @ Y)


def ridge(wd):
  # Minimizer of 0.5 |A x - y|^2 + 0.5 wd |x|^2, where coupled L2 converges.
  return np.linalg.solve(A.T @ A + wd * np.eye(3), A.T @ Y)


def minimize(tx, steps):
  a, y = jnp.asarray(A, jnp.float32), jnp.asarray(Y, jnp.float32)
  loss = lambda p: 0.5 * jnp.sum((a @ p["x"] - y) ** 2)  # noqa: E731

  def body(carry, _):
    params, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  params = {"x": jnp.zeros(3)}
  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return params["x"]


CONVEX_CASES = [
    ("sgd", dict(learning_rate=0.1), LSTSQ),
    ("sgd", dict(learning_rate=0.05, momentum=0.9), LSTSQ),
    ("sgd", dict(learning_rate=0.05, momentum=0.9, nesterov=True), LSTSQ),
    ("sgd", dict(learning_rate=0.1, clip_norm=1.0), LSTSQ),
    ("sgd", dict(learning_rate=0.1, momentum=0.5, weight_decay=0.1), ridge(0.1)),
    ("adam", dict(learning_rate=0.01), LSTSQ),
    ("adam", dict(learning_rate=optax.cosine_decay_schedule(0.05, 2000)), LSTSQ),
    ("adam", dict(learning_rate=0.01, weight_decay=0.1), ridge(0.1)),
    # AdamW's decoupled decay moves its fixed point off the least-squares
    # solution by O(weight_decay) (it is not the ridge solution); with a tiny
    # decay it must still land next to it.
    ("adamw", dict(learning_rate=0.01, weight_decay=1e-4), LSTSQ),
]


@pytest.mark.parametrize(
    "name,kwargs,optimum",
    CONVEX_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CONVEX_CASES)],
)
def test_converges_on_least_squares(name, kwargs, optimum):
  steps = 2000 if name.startswith("adam") else 500
  x = jax.jit(minimize, static_argnums=(0, 1))(make_optimizer(name, **kwargs), steps)
  np.testing.assert_allclose(x, optimum, atol=1e-3 if name == "adamw" else 1e-4)


def test_masked_decay_converges_to_ridge_with_free_bias():
  a, y, wd = jnp.asarray(A, jnp.float32), jnp.asarray(Y, jnp.float32), 0.5
  loss = lambda p: 0.5 * jnp.sum((a @ p["w"][:, 0] + p["b"][0] - y) ** 2)  # noqa: E731
  tx = make_optimizer(
      "sgd", 0.05, momentum=0.9, weight_decay=wd, weight_decay_mask=no_bias_norm_mask
  )

  def body(carry, _):
    params, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
  (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=1000))(
      (params, tx.init(params))
  )
  # Normal equations with the penalty on w only.
  design = np.hstack([A, np.ones((4, 1))])
  optimum = np.linalg.solve(
      design.T @ design + np.diag([wd, wd, wd, 0.0]), design.T @ Y
  )
  np.testing.assert_allclose(params["w"][:, 0], optimum[:3], atol=1e-4)
  np.testing.assert_allclose(params["b"][0], optimum[3], atol=1e-4)


# ---------------------------------------------------------------------------
# Bad arguments.

BAD_ARGS = [
    (
        dict(name="rmsprop"),
        "optimizer name must be one of ['sgd', 'adam', 'adamw'], got 'rmsprop'",
    ),
    (dict(name=None), "optimizer name must be one of ['sgd', 'adam', 'adamw'], got None"),
    (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0"),
    (dict(learning_rate=-0.1), "learning_rate must be > 0, got -0.1"),
    (dict(learning_rate=float("nan")), "learning_rate must be finite, got nan"),
    (dict(learning_rate=float("inf")), "learning_rate must be finite, got inf"),
    (dict(learning_rate="0.1"), "learning_rate must be a real number, got '0.1'"),
    (dict(momentum=-0.1), "momentum must be in [0, 1), got -0.1"),
    (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
    (dict(momentum=float("nan")), "momentum must be finite, got nan"),
    (dict(nesterov=True), "nesterov=True requires momentum > 0, got momentum=0.0"),
    (dict(nesterov="yes", momentum=0.9), "nesterov must be a bool, got 'yes'"),
    (dict(b1=1.0), "b1 must be in [0, 1), got 1.0"),
    (dict(b1=-0.5), "b1 must be in [0, 1), got -0.5"),
    (dict(b2=1.5), "b2 must be in [0, 1), got 1.5"),
    (dict(b2=float("nan")), "b2 must be finite, got nan"),
    (dict(eps=-1e-8), "eps must be >= 0, got -1e-08"),
    (dict(eps=float("nan")), "eps must be finite, got nan"),
    (dict(weight_decay=-0.01), "weight_decay must be >= 0, got -0.01"),
    (dict(weight_decay=float("nan")), "weight_decay must be finite, got nan"),
    (dict(clip_norm=0.0), "clip_norm must be > 0, got 0.0"),
    (dict(clip_norm=-1.0), "clip_norm must be > 0, got -1.0"),
    (dict(clip_norm=float("nan")), "clip_norm must be finite, got nan"),
    (dict(name="adam", momentum=0.9), "momentum must be 0 for adam"),
    (dict(name="adamw", momentum=0.5), "momentum must be 0 for adamw"),
    (dict(name="adam", nesterov=True), "nesterov must be False for adam, got True"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_bad_arguments_raise_value_error(kwargs, message):
  kwargs = {"name": "sgd", "learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    make_optimizer(kwargs.pop("name"), kwargs.pop("learning_rate"), **kwargs)


@pytest.mark.parametrize("max_norm", [0.0, -2.0, float("nan")])
def test_clip_rejects_bad_max_norm(max_norm):
  with pytest.raises(ValueError, match="max_norm must be"):
    clip_by_global_norm_torch(max_norm)


def test_accepts_numpy_and_int_numbers():
  for lr in (np.float32(0.1), 1, jnp.asarray(0.1)):
    make_optimizer("sgd", lr)
  assert OPTIMIZERS == ("sgd", "adam", "adamw")


# ---------------------------------------------------------------------------
# PyTorch parity, recorded from torch 2.13.0 (CPU) so torch is not needed here.
#
# Parameters w (2x3) and b (3) start at TORCH_P0; at step k (0-based) both
# receive the gradients torch_grads(k). The torch loop per step was:
#   w.grad, b.grad = torch.tensor(g["w"]), torch.tensor(g["b"])
#   torch.nn.utils.clip_grad_norm_([w, b], max_norm=clip)   # when clip is set
#   opt.step()
# with opt one of (param groups [{"params": [w]}, {"params": [b]}]):
#   torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
#   torch.optim.Adam(groups, lr=0.01, weight_decay=0.1)
#   torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)
#   torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01)  + clip 1.0
#   torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1) + clip 1.0, with the
#     b group's "weight_decay" set to 0.0 (the mask)
# TORCH_AFTER_5 holds w and b after five steps.

TORCH_P0 = {
    "w": np.array([[0.5, -1.0, 0.25], [1.5, -0.75, 2.0]], np.float32),
    "b": np.array([0.1, -0.2, 0.3], np.float32),
}
TORCH_SCALES = [3.0, 0.2, 2.0, 0.1, 5.0]  # clip 1.0 is active at steps 0, 2, 4.


def torch_grads(k):
  s = TORCH_SCALES[k]
  w = s * np.cos(1.3 * (k + 1) + np.arange(6.0))
  b = s * np.sin(0.7 * (k + 1) + np.arange(3.0))
  return {"w": w.reshape(2, 3).astype(np.float32), "b": b.astype(np.float32)}


TORCH_CASES = {
    "sgd_nesterov_wd": (
        "sgd",
        dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "adam_l2": ("adam", dict(learning_rate=0.01, weight_decay=0.1)),
    "adamw": ("adamw", dict(learning_rate=0.01, weight_decay=0.1)),
    "sgd_momentum_wd_clip": (
        "sgd",
        dict(learning_rate=0.1, momentum=0.9, weight_decay=0.01, clip_norm=1.0),
    ),
    "adamw_clip_nobias": (
        "adamw",
        dict(
            learning_rate=0.01,
            weight_decay=0.1,
            clip_norm=1.0,
            weight_decay_mask=no_bias_norm_mask,
        ),
    ),
}

TORCH_AFTER_5 = {
    "sgd_nesterov_wd": {
        "w": [
            [-0.25446367, -0.4645827, 1.5523549],
            [2.3680608, -1.0787752, 0.70441437],
        ],
        "b": [-1.1487129, -0.7188041, 0.9777638],
    },
    "adam_l2": {
        "w": [[0.4853292, -0.97382265, 0.27212447], [1.5112213, -0.7724086, 1.9736787]],
        "b": [0.06496738, -0.22410195, 0.29218242],
    },
    "adamw": {
        "w": [[0.48466283, -0.9714044, 0.2712635], [1.5081254, -0.770776, 1.9670614]],
        "b": [0.06467872, -0.22335121, 0.29154798],
    },
    "sgd_momentum_wd_clip": {
        "w": [
            [0.5411593, -0.85763866, 0.33867213],
            [1.4504441, -0.86441064, 1.8693998],
        ],
        "b": [-0.19522847, -0.38110307, 0.3914484],
    },
    "adamw_clip_nobias": {
        "w": [[0.4987573, -0.966975, 0.26566646], [1.4953655, -0.77669543, 1.9718068]],
        "b": [0.05714659, -0.22938691, 0.30007103],
    },
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_for_five_steps(case):
  name, kwargs = TORCH_CASES[case]
  history = run(
      make_optimizer(name, **kwargs),
      [torch_grads(k) for k in range(5)],
      params=TORCH_P0,
  )
  for leaf in ("w", "b"):
    np.testing.assert_allclose(
        history[-1][leaf], np.array(TORCH_AFTER_5[case][leaf], np.float32), rtol=1e-6
    )
