"""Models of the lessons, in flax.linen: ``MLP``, ``Pigeon`` and a small ``CNN``.

Every model's ``__call__`` takes ``(inputs, *, train, mask=None)``: ``train``
switches dropout and batch norm between their training and evaluation modes, and
``mask`` (per-example, from padded batches) keeps padding rows out of batch-norm
statistics. ``axis_name`` makes batch norm cross-replica under pmap/shard_map:
statistics are averaged over that axis (leave it ``None`` under plain jit, where
a sharded global batch already gives global statistics).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.nn import conv as _conv

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
}


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")


#: Weight initialisations of :class:`MLP`'s dense layers (same parameter shapes).
INITS = ("flax", "torch")


def _torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch ``nn.Linear``'s weight and bias init."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dense(width: int, fan_in: int, *, init: str, use_bias: bool = True) -> nn.Dense:
  if init == "torch":
    return nn.Dense(width, use_bias=use_bias, kernel_init=_torch_uniform(fan_in),
                    bias_init=_torch_uniform(fan_in))
  return nn.Dense(width, use_bias=use_bias)


class BatchNorm(nn.Module):
  """Batch norm with PyTorch's semantics, exact over masks and devices.

  Statistics come from masked sums and counts added over ``axis_name`` (so a
  device holding only padding rows, or fewer real rows than the others, is
  weighted correctly, where averaging per-device means is not); the running
  variance is updated with the unbiased batch variance, as
  ``torch.nn.BatchNorm*d`` does. Parameter and statistic names follow
  ``flax.linen.BatchNorm`` (scale, bias; mean, var).

  Attributes:
    momentum: weight of the old running statistics (PyTorch's 1 - momentum).
    epsilon: added to the variance.
    axis_name: the mapped axis to aggregate statistics over, or None.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    features = x.shape[-1]
    mean_stat = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    var_stat = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones_init(), (features,))
    bias = self.param("bias", nn.initializers.zeros_init(), (features,))
    if not train:
      mean, var = mean_stat.value, var_stat.value
    else:
      count, mean, var = masked_moments(x, mask, self.axis_name)
      if not self.is_initializing():
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        mean_stat.value = self.momentum * mean_stat.value + (1 - self.momentum) * mean
        var_stat.value = self.momentum * var_stat.value + (1 - self.momentum) * unbiased
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(x.dtype)


def masked_moments(x, mask, axis_name):
  """``(count, mean, var)`` over every axis but the last of ``x``, from masked
  sums added over ``axis_name`` (None: this device's rows): a device holding
  only padding, or fewer rows than the others, weighs what it holds."""
  xf = x.astype(jnp.float32)
  weights = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  if mask is not None:
    weights = weights * mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  axes = tuple(range(x.ndim - 1))
  sums = (jnp.sum(weights), jnp.sum(xf * weights, axes), jnp.sum(xf * xf * weights, axes))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  count, total, squares = sums
  mean = total / jnp.maximum(count, 1.0)
  return count, mean, jnp.maximum(squares / jnp.maximum(count, 1.0) - mean * mean, 0.0)


def _batch_norm(module: nn.Module, x, *, train: bool, mask):
  # PyTorch's BatchNorm defaults: momentum 0.1 (ours: 0.9), eps 1e-5.
  return BatchNorm(axis_name=module.axis_name)(x, train=train, mask=mask if train else None)


class MLP(nn.Module):
  """A multi-layer perceptron; inputs are flattened after the batch axis.

  Attributes:
    hidden_sizes: width of each hidden layer.
    outputs: width of the output layer (1 for a single logit).
    activation: a name from ``ACTIVATIONS``.
    dropout_rate: dropout after each hidden activation, in [0, 1).
    batch_norm: batch norm before each hidden activation.
    axis_name: cross-replica batch norm axis under pmap/shard_map.
    init_style: ``"flax"`` (lecun-normal kernels, zero biases) or ``"torch"``
      (PyTorch ``nn.Linear``'s default: kernels and biases uniform in
      ``+-1/sqrt(fan_in)``); the parameter shapes are the same.

  >>> import jax, jax.numpy as jnp
  >>> model = MLP(hidden_sizes=(16,), outputs=2)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 2)), train=False)
  >>> model.apply(variables, jnp.zeros((5, 2)), train=False).shape
  (5, 2)
  """

  hidden_sizes: Sequence[int]
  outputs: int
  activation: str = "relu"
  dropout_rate: float = 0.0
  batch_norm: bool = False
  axis_name: str | None = None
  init_style: str = "flax"  # not ``init``: that would shadow Module.init

  def __post_init__(self):
    _check_rate(self.dropout_rate)
    if self.init_style not in INITS:
      raise ValueError(f"init_style must be one of {INITS}, got {self.init_style!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
      )
    if self.outputs < 1 or any(h < 1 for h in self.hidden_sizes):
      raise ValueError(
          f"layer sizes must be >= 1, got hidden_sizes={tuple(self.hidden_sizes)} "
          f"outputs={self.outputs}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, *, train: bool, mask=None):
    x = inputs.reshape(inputs.shape[0], -1).astype(jnp.float32)
    for width in self.hidden_sizes:
      x = _dense(width, x.shape[-1], init=self.init_style, use_bias=not self.batch_norm)(x)
      if self.batch_norm:
        x = _batch_norm(self, x, train=train, mask=mask)
      x = ACTIVATIONS[self.activation](x)
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return _dense(self.outputs, x.shape[-1], init=self.init_style)(x)


def Pigeon(hidden: int = 30, *, dropout_rate: float = 0.0, init_style: str = "flax") -> MLP:
  """The lessons' "pigeon": 784 inputs, one ReLU hidden layer, one logit.

  ``init_style="torch"`` initialises as the lessons' PyTorch ``nn.Linear`` layers did.

  >>> Pigeon().hidden_sizes
  (30,)
  """
  return MLP(hidden_sizes=(hidden,), outputs=1, dropout_rate=dropout_rate,
             init_style=init_style)


class CNN(nn.Module):
  """Conv / batch norm / ReLU / 2x2 max-pool blocks, dropout and a dense head.

  Works for 28x28x1 (MNIST) and 32x32x3 (CIFAR-10) images, or any NHWC input
  (uint8 inputs are scaled to [0, 1]).

  Attributes:
    features: output channels of each 3x3 conv block.
    dense: width of the hidden dense layer (0 for none).
    outputs: number of classes.
    dropout_rate: dropout before the head, in [0, 1).
    batch_norm: batch norm after each conv.
    axis_name: cross-replica batch norm axis under pmap/shard_map.
    conv_impl: ``"auto"`` (shifted-slice matmuls on CPU, ``lax.conv`` elsewhere),
      ``"xla"`` or ``"matmul"``; see :mod:`jaxtrain.conv`.
    pool: ``"each"`` (2x2 max-pool after every conv block) or ``"last"`` (one
      pool after the last block, e.g. conv32-conv64-pool-dense128).

  >>> import jax, jax.numpy as jnp
  >>> model = CNN(features=(8,), dense=16, outputs=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  >>> model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False).shape
  (2, 10)
  """

  features: Sequence[int] = (32, 64)
  dense: int = 128
  outputs: int = 10
  dropout_rate: float = 0.0
  batch_norm: bool = True
  axis_name: str | None = None
  conv_impl: str = "auto"
  pool: str = "each"

  def __post_init__(self):
    _check_rate(self.dropout_rate)
    _conv.check_impl(self.conv_impl)
    if self.pool not in ("each", "last"):
      raise ValueError(f"pool must be 'each' or 'last', got {self.pool!r}")
    if any(not isinstance(w, numbers.Integral) or w < 1 for w in self.features):
      raise ValueError(f"features must be channel counts >= 1, got {tuple(self.features)}")
    if self.dense < 0 or self.outputs < 1:
      raise ValueError(f"dense must be >= 0 and outputs >= 1, got dense={self.dense} "
                       f"outputs={self.outputs}")
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, *, train: bool, mask=None):
    if inputs.ndim == 3:  # [batch, H, W] grayscale
      inputs = inputs[..., None]
    if inputs.ndim != 4:
      raise ValueError(f"CNN inputs must be [batch, H, W, C], got shape {inputs.shape}")
    x = inputs.astype(jnp.float32)
    if inputs.dtype == jnp.uint8:
      x = x / 255.0
    for i, width in enumerate(self.features):
      x = _conv.Conv3x3(width, use_bias=not self.batch_norm, impl=self.conv_impl)(x)
      if self.batch_norm:
        x = _batch_norm(self, x, train=train, mask=mask)
      x = nn.relu(x)
      if self.pool == "each" or i == len(self.features) - 1:
        x = _conv.max_pool_2x2(x, impl=self.conv_impl)
    x = x.reshape(x.shape[0], -1)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    if self.dense:
      x = nn.relu(nn.Dense(self.dense)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.outputs)(x)
