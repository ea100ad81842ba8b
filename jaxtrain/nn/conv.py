"""3x3 convolutions and 2x2 max-pooling with a backend-chosen implementation.

XLA's CPU convolutions are several times slower than its matmuls (and than
PyTorch's oneDNN convolutions), so on CPU a 3x3 "SAME" convolution is computed as
nine shifted slices concatenated on the channel axis and one matmul against the
reshaped kernel, and so are other kernel sizes up to 7x7 and strides of 1 or 2
(a 1x1 kernel: any stride) in :func:`conv_matmul`, which :func:`flax_convs`
gives ``nn.Conv``; max-pooling becomes a reshape and a max. Their backward passes
are slices, pads and matmuls too (the kernel's gradient in the layout of
:func:`jaxtrain.matmul.matmul`), all fast on CPU. On GPU/TPU ``lax.conv`` and
``reduce_window`` stay. Both implementations share the same parameters (a
``[3, 3, in, out]`` kernel, like ``nn.Conv``), so a checkpoint moves freely
between backends, and agree within float tolerance.
"""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.nn import matmul as _matmul

IMPLS = ("auto", "xla", "matmul")


def check_impl(impl: str) -> None:
  """Refuses an implementation name other than ``"auto"``, ``"matmul"`` or ``"xla"``.

  Raises:
    ValueError: naming the value and the choices.
  """
  if impl not in IMPLS:
    raise ValueError(f"conv_impl must be one of {IMPLS}, got {impl!r}")


def resolve_impl(impl: str) -> str:
  """``"auto"`` -> ``"matmul"`` on CPU, ``"xla"`` on other backends."""
  return _matmul.backend_impl(impl, IMPLS, cpu="matmul", what="conv_impl")


def conv3x3_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 'SAME' 3x3 convolution (NHWC, HWIO) as slices and one matmul.

  >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  >>> k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  >>> ref = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
  ...     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> bool(jnp.allclose(conv3x3_matmul(x, k), ref, atol=1e-5))
  True
  """
  _, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Channel-last concatenation in (row, column, channel) order matches the
  # row-major reshape of the HWIO kernel below.
  patches = jnp.concatenate(
      [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)],
      axis=-1,
  )
  return _matmul.matmul(patches, kernel.reshape(9 * channels, kernel.shape[-1]))


def conv_matmul(x: jax.Array, kernel: jax.Array, padding="SAME",
                strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """A 2-D convolution (NHWC, HWIO kernel of any small size) as shifted slices
  and one matmul. ``padding``: ``"SAME"``, ``"VALID"`` or ``((low, high), (low,
  high))``, as ``lax.padtype_to_pads`` computes it for these ``strides``.

  A stride ``s`` reads every ``s``-th row of the padded input. Rather than
  strided slices (measured up to 2.6x slower to gather on XLA:CPU, their
  gradient a pad with holes), the padded input is reshaped so that ``s``
  neighbouring columns become one pixel of ``s * in`` channels and each row's
  phase an axis: every tap is then a plain slice, and taps side by side in a
  kernel row share one. A 1x1 kernel is one slice and a matmul over the
  channel axis.

  >>> x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  >>> k = jax.random.normal(jax.random.key(1), (5, 3, 3, 4))
  >>> ref = jax.lax.conv_general_dilated(x, k, (2, 1), "SAME",
  ...     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> bool(jnp.allclose(conv_matmul(x, k, "SAME", (2, 1)), ref, atol=1e-4))
  True
  """
  kh, kw, channels, features = kernel.shape
  (sh, sw), (batch, height, width, _) = strides, x.shape
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads((height, width), (kh, kw), strides, padding)
  (top, bottom), (left, right) = padding
  out_h = (height + top + bottom - kh) // sh + 1
  out_w = (width + left + right - kw) // sw + 1
  # Rows (columns) the taps read, rounded to whole strides: pad the far side up
  # to them (negative padding drops rows no tap reads).
  rows, cols = (kh - 1) // sh + out_h, (kw - 1) // sw + out_w
  padded = jax.lax.pad(x, jnp.zeros((), x.dtype), (
      (0, 0, 0), (top, rows * sh - height - top, 0),
      (left, cols * sw - width - left, 0), (0, 0, 0)))
  # Channel-last concatenation in (row, column, channel) order matches the
  # row-major reshape of the HWIO kernel: columns j..j+sw-1 are one slice.
  if (sh, sw) == (1, 1):  # the plain slices, without the reshape below
    parts = [padded[:, i : i + out_h, j : j + out_w] for i in range(kh) for j in range(kw)]
  else:
    phased = padded.reshape(batch, rows, sh, cols, sw * channels)
    parts = [phased[:, i // sh : i // sh + out_h, i % sh, j // sw : j // sw + out_w,
                    : min(sw, kw - j) * channels]
             for i in range(kh) for j in range(0, kw, sw)]
  patches = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
  return _matmul.matmul(patches, kernel.reshape(kh * kw * channels, features))


def _matmul_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None,
                                 feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` for ``nn.Conv``: the cases :func:`conv_matmul`
  computes (2-D, NHWC/HWIO, strides 1 or 2, or any for a 1x1 kernel, no
  dilation, one group, small kernel) as a matmul, every other one by ``lax``."""
  ones = (1,) * (lhs.ndim - 2)
  simple = (
      lhs.ndim == 4 and _covered_strides(window_strides, rhs.shape[:2])
      and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
      and feature_group_count == 1 and precision is None
      and not any(v is not None for v in kwargs.values())  # nnx.Conv: out_sharding=None
      and tuple(dimension_numbers) == _FLAX_NHWC
      and rhs.shape[0] * rhs.shape[1] <= MAX_KERNEL_TAPS
      and (padding in ("SAME", "VALID") or (
          not isinstance(padding, str) and all(lo >= 0 and hi >= 0 for lo, hi in padding))))
  if not simple:
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k != "out_sharding"}
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  return conv_matmul(lhs, rhs, padding, tuple(window_strides))


def _covered_strides(strides, kernel_size) -> bool:
  """Strides of 1 or 2 (those tested against ``lax``); any for a 1x1 kernel."""
  if tuple(kernel_size) == (1, 1):
    return all(s >= 1 for s in strides)
  return all(s in (1, 2) for s in strides)


# nn.Conv's dimension numbers for NHWC inputs (lhs, rhs, out specs).
_FLAX_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
MAX_KERNEL_TAPS = 49  # up to 7x7: the patches hold kh*kw copies of the input


def _swap_conv(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != "__call__" or type(module) is not nn.Conv
      or module.conv_general_dilated is not None or module.conv_general_dilated_cls
      is not None):
    return next_fun(*args, **kwargs)
  # The module keeps its own code (parameters, padding modes, dtypes, bias);
  # only the primitive it calls changes, for this call.
  object.__setattr__(module, "conv_general_dilated", _matmul_conv_general_dilated)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, "conv_general_dilated", None)


@contextlib.contextmanager
def flax_convs(impl: str = "auto"):
  """Within this context, every plain ``flax.linen.Conv`` traced runs as
  :func:`conv_matmul` where it can (``impl="auto"``: on CPU; ``"matmul"``:
  always; ``"xla"``: never): the model is unchanged, its parameters the same.
  ``fit`` traces its programs inside it, so your own ``nn.Conv`` models train
  at the speed of :class:`Conv3x3` on CPU and loop (``execution="scan"``).

  >>> import numpy as np
  >>> conv = nn.Conv(4, (3, 3))
  >>> x = jnp.ones((2, 5, 5, 3))
  >>> variables = conv.init(jax.random.key(0), x)
  >>> with flax_convs("matmul"):
  ...   fast = jax.jit(conv.apply)(variables, x)
  >>> bool(np.allclose(fast, conv.apply(variables, x), atol=1e-5))
  True
  """
  if resolve_impl(impl) == "xla":
    yield
    return
  token = _SWAP.set(True)
  try:
    with nn.intercept_methods(_swap_conv):
      yield
  finally:
    _SWAP.reset(token)


# Whether flax_convs is on: NNX modules (no interceptors) ask at their merge.
_SWAP = contextvars.ContextVar("jaxtrain_flax_convs", default=False)


def swap_nnx_convs(module) -> None:
  """Within :func:`flax_convs`, points every plain ``nnx.Conv`` of ``module``
  (a module jaxtrain just merged, never the user's) at the matmul path, as
  ``nn.Conv`` layers are: the module's code and parameters are unchanged."""
  if not _SWAP.get():
    return
  from flax import nnx

  for _, sub in nnx.iter_graph(module):
    if type(sub) is nnx.Conv and sub.conv_general_dilated is jax.lax.conv_general_dilated:
      sub.conv_general_dilated = _matmul_conv_general_dilated


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same 3x3 'SAME' convolution by ``lax.conv_general_dilated`` (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def max_pool_2x2(x: jax.Array, *, impl: str = "auto") -> jax.Array:
  """2x2 max-pooling with stride 2 (odd trailing rows/columns are dropped).

  >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  >>> max_pool_2x2(x, impl="matmul")[0, :, :, 0].tolist()
  [[5.0, 7.0], [13.0, 15.0]]
  """
  if resolve_impl(impl) == "xla":
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2, :]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv3x3(nn.Module):
  """A 3x3 stride-1 'SAME' convolution with ``nn.Conv``'s parameters and init.

  Attributes:
    features: output channels.
    use_bias: add a bias (off when batch norm follows).
    impl: ``"auto"``, ``"xla"`` or ``"matmul"``.
  """

  features: int
  use_bias: bool = True
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
    )
    conv = conv3x3_xla if resolve_impl(self.impl) == "xla" else conv3x3_matmul
    y = conv(x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return y
