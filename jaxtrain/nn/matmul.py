"""Matrix products whose weight gradient takes XLA:CPU's fast matmul path.

The gradient of ``y = x @ w`` with respect to ``w`` is ``x^T @ dy``, a product
that contracts the *leading* (batch) axis of both operands. XLA:CPU hands
products in the usual layout (contract the last axis of the left operand with
the first of the right) to its fast library kernels, but runs this transposed
contraction through a slower generic path. :func:`matmul` computes the same
gradient as ``(dy^T @ x)^T``: a product in the usual layout, then a transpose of
the small ``[in, out]`` result. On CPU that made a step of the lessons' CNN
(whose convolutions are matmuls, see :mod:`jaxtrain.conv`) ~20% faster
(benchmarks' CNN row); dense layers measured no difference, so they keep
``nn.Dense``'s product. Other backends keep XLA's own gradient (``jnp.matmul``).

The values are the same products summed in the same precision; they agree with
``x @ w`` and its gradient within float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "cpu")


def backend_impl(impl: str, impls: tuple[str, ...], *, cpu: str, what: str) -> str:
  """Checks ``impl`` is one of ``impls``; ``"auto"`` -> ``cpu`` on the CPU backend,
  ``"xla"`` on the others. Shared by :mod:`jaxtrain.conv`.

  >>> backend_impl("xla", IMPLS, cpu="cpu", what="impl")
  'xla'
  """
  if impl not in impls:
    raise ValueError(f"{what} must be one of {impls}, got {impl!r}")
  if impl == "auto":
    return cpu if jax.default_backend() == "cpu" else "xla"
  return impl


def resolve_impl(impl: str) -> str:
  """``"auto"`` -> ``"cpu"`` on the CPU backend, ``"xla"`` elsewhere."""
  return backend_impl(impl, IMPLS, cpu="cpu", what="matmul impl")


@jax.custom_vjp
def _matmul_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _matmul_cpu_fwd(x, w):
  return x @ w, (x, w)


def _matmul_cpu_bwd(residuals, dy):
  x, w = residuals
  rows_x = x.reshape(-1, x.shape[-1])
  rows_dy = dy.reshape(-1, dy.shape[-1])
  dw = (rows_dy.T @ rows_x).T
  return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def matmul(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
  """``x @ w`` for ``x: [..., in]`` and a 2-D ``w: [in, out]``.

  >>> x = jax.random.normal(jax.random.key(0), (4, 3))
  >>> w = jax.random.normal(jax.random.key(1), (3, 2))
  >>> loss = lambda w, impl: matmul(x, w, impl=impl).sum()
  >>> bool(jnp.allclose(jax.grad(loss)(w, "cpu"), jax.grad(loss)(w, "xla"), atol=1e-6))
  True
  """
  if jnp.ndim(w) != 2 or jnp.ndim(x) < 1 or jnp.shape(x)[-1] != jnp.shape(w)[0]:
    raise ValueError(
        f"matmul needs x [..., in] and w [in, out], got shapes {jnp.shape(x)} and "
        f"{jnp.shape(w)}")
  if resolve_impl(impl) == "xla" or jnp.ndim(x) < 2:
    return jnp.matmul(x, w)
  return _matmul_cpu(x, w)
