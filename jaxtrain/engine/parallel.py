"""Data parallelism: one per-device step under pmap, shard_map or sharded jit.

``train_step(..., axis_name=AXIS)`` is written once. :func:`pmap_steps` and
:func:`shard_map_steps` wrap it for the local devices; :func:`sharded_jit_steps`
runs the plain step under ``jax.jit`` with the batch sharded over a ``"data"``
mesh axis and the state replicated, which is the road to many hosts.

On CPU, collectives of many asynchronously queued multi-device steps can abort
inside XLA's rendezvous; :class:`InFlight` bounds the steps in flight (the loop
uses it, and so should a hand-written loop).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.core.step import eval_step, train_step

AXIS = "batch"


def local_mesh(devices: Sequence[jax.Device] | None = None, axis: str = AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all local devices)."""
  devices = list(devices) if devices is not None else jax.local_devices()
  return Mesh(np.asarray(devices), (axis,))


@functools.cache
def on_one_device(fn, in_specs, out_specs=P()):
  """``fn(..., axis_name=AXIS)`` jitted as a ``shard_map`` over one local device.

  A per-device step's collectives (the gradient ``psum``, cross-replica batch
  norm) then reduce over an axis of size one, so the step of any run can be run,
  or lowered for its cost, outside the run's programs, on the global batch."""
  mesh = local_mesh(jax.local_devices()[:1])
  return jax.jit(jax.shard_map(functools.partial(fn, axis_name=AXIS), mesh=mesh,
                               in_specs=in_specs, out_specs=out_specs))


def run_devices(count: int) -> list[jax.Device]:
  """The ``count`` devices a data-parallel run trains on, across every process:
  the first ``count`` local devices in one process; with several processes
  (``jax.distributed``) the first ``count / process_count`` devices of each,
  process by process, so every process feeds its own devices.

  >>> run_devices(1) == jax.local_devices()[:1]
  True
  """
  processes = jax.process_count()
  if processes == 1:
    return jax.local_devices()[:count]
  per, rest = divmod(count, processes)
  if rest or not per:
    raise ValueError(f"devices must be a multiple of the {processes} processes, got {count}")
  by_process = {}
  for device in jax.devices():
    by_process.setdefault(device.process_index, []).append(device)
  return [d for p in sorted(by_process) for d in by_process[p][:per]]


def local_rows(rows: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's contiguous slice of a global batch's leading axis (inside a
  ``shard_map`` over ``axis_name``; the whole batch when it is None)."""
  if axis_name is None:
    return rows
  shards = jax.lax.axis_size(axis_name)
  size = rows.shape[0] // shards
  return jax.lax.dynamic_slice_in_dim(rows, jax.lax.axis_index(axis_name) * size, size)


def replicate(tree, devices: Sequence[jax.Device] | None = None):
  """Gives every leaf a leading device axis, one copy per device (for pmap).

  Each device receives its own copy; nothing is stacked on one device first.
  """
  mesh = local_mesh(devices)
  sharding = NamedSharding(mesh, P(AXIS))
  devs = list(mesh.devices.flat)

  def put(x):
    x = jnp.asarray(x)
    shards = [jax.device_put(x[None], d) for d in devs]
    return jax.make_array_from_single_device_arrays(
        (len(devs),) + x.shape, sharding, shards
    )

  return jax.tree.map(put, tree)


def unreplicate(tree):
  """The first device's copy of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def replicate_on_mesh(tree, mesh: Mesh):
  """Places a tree fully replicated on ``mesh`` (for shard_map / sharded jit)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def _check_divisible(batch, n_devices: int) -> int:
  sizes = {k: np.shape(v)[0] for k, v in batch.items()}
  size = next(iter(sizes.values()))
  if size % n_devices:
    raise ValueError(
        f"global batch size {size} is not divisible by the {n_devices} devices"
    )
  return size


def shard_batch(batch, devices: Sequence[jax.Device] | None = None):
  """Splits a global batch ``[n * b, ...]`` into ``[n, b, ...]`` over devices (pmap)."""
  mesh = local_mesh(devices)
  n = mesh.devices.size
  _check_divisible(batch, n)
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(np.reshape(x, (n, -1) + np.shape(x)[1:]), sharding),
      batch,
  )


def unshard(tree):
  """Merges a leading device axis back into the batch axis."""
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def shard_batch_on_mesh(batch, mesh: Mesh, axis: str | None = None):
  """Places a global batch with its leading axis split over ``mesh``'s axis."""
  axis = axis or mesh.axis_names[0]
  _check_divisible(batch, mesh.shape[axis])
  return jax.device_put(batch, NamedSharding(mesh, P(axis)))


def _refuse_donated(train, donate: bool):
  """``train`` with a check that its state was not donated to an earlier call.

  A donated state's buffers belong to the call it was given to; reading them
  again raises inside ``jax.jit`` but can crash the process under ``pmap``.
  """
  if not donate:
    return train

  @functools.wraps(train)
  def checked(state, *args, **kwargs):
    if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state)):
      raise ValueError(
          "the state passed to train() was donated to an earlier call: use the state "
          "that call returned, or build the steps with donate=False to keep it")
    return train(state, *args, **kwargs)

  return checked


def pmap_steps(devices: Sequence[jax.Device] | None = None, *, donate: bool = True):
  """``(train, eval)`` steps pmapped over ``devices`` (default: all local ones).

  train: ``(replicated_state, sharded_batch, key) -> (state, metrics)``; the key
  is shared and each device folds in its index. Metrics come back replicated.

  >>> train, evaluate = pmap_steps()
  """
  train = jax.pmap(
      functools.partial(train_step, axis_name=AXIS),
      axis_name=AXIS,
      in_axes=(0, 0, None),
      donate_argnums=(0,) if donate else (),
      devices=devices,
  )
  evaluate = jax.pmap(
      functools.partial(eval_step, axis_name=AXIS), axis_name=AXIS, devices=devices
  )
  return _refuse_donated(train, donate), evaluate


def shard_map_steps(mesh: Mesh | None = None, *, donate: bool = True):
  """``(train, eval)`` steps as jitted ``shard_map``s over a 1-D mesh.

  The state is replicated (``P()``), the global batch split on its leading axis;
  each device runs the same per-device step on its shard.

  >>> train, evaluate = shard_map_steps()
  """
  mesh = mesh or local_mesh()
  axis = mesh.axis_names[0]
  train = jax.shard_map(
      functools.partial(train_step, axis_name=axis),
      mesh=mesh,
      in_specs=(P(), P(axis), P()),
      out_specs=P(),
  )
  evaluate = jax.shard_map(
      functools.partial(eval_step, axis_name=axis),
      mesh=mesh,
      in_specs=(P(), P(axis)),
      out_specs=P(),
  )
  train = jax.jit(train, donate_argnums=(0,) if donate else ())
  return _refuse_donated(train, donate), jax.jit(evaluate)


def sharded_jit_steps(mesh: Mesh, *, donate: bool = True):
  """``(train, eval)`` under plain ``jax.jit``: batch sharded, state replicated.

  No axis name: XLA's SPMD partitioner inserts the collectives, and batch norm
  sees the global batch. Use a mesh whose first axis is ``"data"``.

  >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
  >>> train, evaluate = sharded_jit_steps(mesh)
  """
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(mesh.axis_names[0]))
  train = jax.jit(
      train_step,
      in_shardings=(replicated, data, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,) if donate else (),
  )
  evaluate = jax.jit(
      eval_step, in_shardings=(replicated, data), out_shardings=replicated
  )
  return _refuse_donated(train, donate), evaluate


def default_max_in_flight(devices: Sequence[jax.Device] | None = None) -> int:
  """How many multi-device steps may be queued: 1 on CPU with several devices."""
  devices = list(devices) if devices is not None else jax.local_devices()
  if len(devices) > 1 and devices[0].platform == "cpu":
    return 1
  return 8


class InFlight:
  """Bounds the number of dispatched, unfinished steps.

  Call it with each step's (small) output right after dispatching the step: it
  waits for the oldest outputs until fewer than ``limit`` are pending, so at most
  ``limit`` steps are ever queued; ``limit=1`` finishes each step before the next.

  >>> window = InFlight(limit=2)
  >>> for i in range(5):
  ...   window(jnp.ones(()) * i)
  >>> window.drain()
  """

  def __init__(self, limit: int | None = None):
    self.limit = limit if limit is not None else default_max_in_flight()
    if self.limit < 1:
      raise ValueError(f"limit must be >= 1, got {self.limit}")
    self._pending = collections.deque()

  def __call__(self, output) -> None:
    self._pending.append(output)
    while len(self._pending) >= self.limit:
      jax.block_until_ready(self._pending.popleft())

  def drain(self) -> None:
    """Waits until every step in flight has finished."""
    while self._pending:
      jax.block_until_ready(self._pending.popleft())
