"""The lessons' CNN written in Flax NNX, the API Flax's documentation teaches
first: the same network as :class:`jaxtrain.models.CNN` (3x3 conv blocks with
PyTorch-style batch norm, ReLU and 2x2 max-pooling, dropout, a dense head),
built eagerly from an ``nnx.Rngs`` like any NNX module.

``fit`` runs its plain ``nnx.Conv`` layers as shifted slices and one matmul on
CPU, as it does ``nn.Conv``. :func:`cnn_from_linen` builds it holding a Linen
:class:`~jaxtrain.models.CNN`'s variables, so the two start alike and train to
the same numbers up to float rounding (dropout aside: the two frameworks draw
their masks from the step's key by different rules).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.nn import conv as _conv
from jaxtrain.nn.models import masked_moments


class BatchNorm(nnx.Module):
  """:class:`jaxtrain.models.BatchNorm` in NNX: statistics from masked sums
  added over ``axis_name``, the running variance updated with the unbiased
  batch variance (PyTorch's rule). ``use_running_average`` is the mode
  (``nnx.view`` / ``Module.eval()`` set it)."""

  def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               axis_name: str | None = None, use_running_average: bool = False):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.momentum, self.epsilon, self.axis_name = momentum, epsilon, axis_name
    self.use_running_average = use_running_average

  def __call__(self, x, mask=None):
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      count, mean, var = masked_moments(x, mask, self.axis_name)
      unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
      self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
      self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * unbiased
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class CNN(nnx.Module):
  """Conv / batch norm / ReLU / 2x2 max-pool blocks, dropout and a dense head.

  Args:
    image_shape: one input's ``(H, W, C)`` (NNX layers know their input sizes).
    features, dense, outputs, dropout_rate, batch_norm, axis_name, pool: as
      :class:`jaxtrain.models.CNN`'s fields.
    rngs: the module's ``nnx.Rngs`` (parameters, and its dropout stream, which
      jaxtrain replaces with the step's keys while training).

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = CNN((28, 28, 1), features=(8,), dense=16, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 28, 28, 1))).shape
  (2, 10)
  """

  def __init__(self, image_shape: Sequence[int], *, features: Sequence[int] = (32, 64),
               dense: int = 128, outputs: int = 10, dropout_rate: float = 0.0,
               batch_norm: bool = True, axis_name: str | None = None, pool: str = "each",
               rngs: nnx.Rngs):
    if pool not in ("each", "last"):
      raise ValueError(f"pool must be 'each' or 'last', got {pool!r}")
    height, width, channels = image_shape
    convs, norms = [], []
    for i, out in enumerate(features):
      convs.append(nnx.Conv(channels, out, (3, 3), padding="SAME", use_bias=not batch_norm,
                            rngs=rngs))
      norms.append(BatchNorm(out, axis_name=axis_name) if batch_norm else None)
      channels = out
      if pool == "each" or i == len(features) - 1:
        height, width = height // 2, width // 2
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.pool = pool
    flat = height * width * channels
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate else None
    self.hidden = nnx.Linear(flat, dense, rngs=rngs) if dense else None
    self.head = nnx.Linear(dense or flat, outputs, rngs=rngs)

  def __call__(self, inputs, mask=None):
    x = inputs[..., None] if inputs.ndim == 3 else inputs
    x = x.astype(jnp.float32) / (255.0 if inputs.dtype == jnp.uint8 else 1.0)
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      x = conv(x)
      if norm is not None:
        x = norm(x, mask=mask)
      x = jax.nn.relu(x)
      if self.pool == "each" or i == len(self.convs) - 1:
        x = _conv.max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    if self.dropout is not None:
      x = self.dropout(x)
    if self.hidden is not None:
      x = jax.nn.relu(self.hidden(x))
      if self.dropout is not None:
        x = self.dropout(x)
    return self.head(x)


def cnn_from_linen(image_shape: Sequence[int], linen_cnn, variables: dict, *,
                   rngs: nnx.Rngs | None = None) -> CNN:
  """The NNX :class:`CNN` of a Linen :class:`jaxtrain.models.CNN`'s fields,
  holding its ``variables`` (``{"params", "batch_stats"}``): the same network,
  started alike."""
  model = CNN(image_shape, features=linen_cnn.features, dense=linen_cnn.dense,
              outputs=linen_cnn.outputs, dropout_rate=linen_cnn.dropout_rate,
              batch_norm=linen_cnn.batch_norm, axis_name=linen_cnn.axis_name,
              pool=linen_cnn.pool, rngs=rngs or nnx.Rngs(0))
  params, stats = variables["params"], variables.get("batch_stats", {})
  for i, conv in enumerate(model.convs):
    conv.kernel[...] = params[f"Conv3x3_{i}"]["kernel"]
    if conv.bias is not None:
      conv.bias[...] = params[f"Conv3x3_{i}"]["bias"]
    norm = model.norms[i]
    if norm is not None:
      norm.scale[...], norm.bias[...] = (params[f"BatchNorm_{i}"][k] for k in ("scale", "bias"))
      norm.mean[...], norm.var[...] = (stats[f"BatchNorm_{i}"][k] for k in ("mean", "var"))
  dense_layers = [layer for layer in (model.hidden, model.head) if layer is not None]
  for i, layer in enumerate(dense_layers):
    layer.kernel[...], layer.bias[...] = (params[f"Dense_{i}"][k] for k in ("kernel", "bias"))
  return model
