"""ResNet-18 train steps on CIFAR-sized data with ``lax.conv`` against the
matmul convolutions of ``jaxtrain.nn.conv.flax_convs`` (issue 29).

    uv run python -m benchmarks.resnet_convs [--widths 16 64] [--batch 64]

Model: flax ``examples/imagenet/models.py`` (``ResNetBlock``, ``ResNet``,
``ResNet18``) as pasted unchanged in ``tests/published.py``, ``num_classes=10``, ``num_filters`` from
``--widths``: a 7x7 stride-2 stem, 3x3 convolutions of strides 1 and 2 and 1x1
stride-2 projections, batch norm (its statistics mutable). Its batch norm
averages over the axis ``"batch"``, so the step runs in a ``shard_map`` over a
one-device mesh of that axis name (the mean over one device is the identity).

Data: synthetic 32x32x3 images and 10-class labels, ``--batch`` per step.
Step: cross-entropy, ``optax.sgd(0.1, momentum=0.9)``, one ``jax.jit`` program,
either straight-line (one step per call) or a ``jax.lax.scan`` over
``SCAN_STEPS`` steps per call. Each is traced and compiled within
``flax_convs("xla")`` (every ``nn.Conv`` by ``lax.conv``) or
``flax_convs("matmul")`` (as slices and matmuls where covered).

Timing: ``--steps`` (>= 10) steady steps after a warm-up call, ``--repeats``
times (once when the warm-up call took over ``SLOW_CALL_S``: XLA's
convolutions in a scan can take seconds a step); the table gives the median
steps/s. The forward values of the two
implementations are checked equal (to float32 rounding) first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain.nn.conv import flax_convs
from tests import published

SCAN_STEPS = 4  # train steps per call of the scanned program
SLOW_CALL_S = 2.0  # a warm-up call slower than this: one timed repeat, not --repeats

# flax examples/imagenet/models.py, pasted unchanged (google/flax at 18f8f311).
ResNet18 = published.ResNet18


def one_device(fn):
  """``fn`` in a ``shard_map`` over a one-device mesh named ``"batch"`` (the
  model's batch norm averages over that axis)."""
  mesh = jax.make_mesh((1,), ("batch",), devices=jax.devices()[:1])
  spec = jax.sharding.PartitionSpec()
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)


def create_state(model, tx, x) -> dict:
  """Parameters, batch statistics and optimizer state, in one pytree."""
  variables = model.init(jax.random.key(0), x, train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(variables["params"])}


def make_train_step(model, tx):
  """One SGD step: ``(state, batch) -> (state, loss)``."""

  def train_step(state, batch):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]}, batch["image"],
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

  return train_step


def make_scan(train_step):
  """``SCAN_STEPS`` steps in one program: ``(state, batches) -> (state, losses)``."""
  return lambda state, batches: jax.lax.scan(train_step, state, batches)


def compile_program(fn, impl: str, *args):
  """``fn`` traced and compiled within ``flax_convs(impl)``; and its seconds.

  ``fn`` must be a new function (and its scan body too): JAX caches the traces
  of a function it has seen (jit, scan bodies), and a trace made within the
  other ``flax_convs`` would be reused. The compiled program is checked to
  run XLA convolutions for ``"xla"`` only.
  """
  start = time.perf_counter()
  with flax_convs(impl):
    compiled = jax.jit(one_device(fn)).lower(*args).compile()
  seconds = time.perf_counter() - start
  if ("convolution(" in compiled.as_text()) != (impl == "xla"):
    raise AssertionError(f"the {impl!r} program's convolutions are not its own")
  return compiled, seconds


def steps_per_second(program, state, data, calls: int, steps_per_call: int,
                     repeats: int) -> tuple[float, int]:
  """Median over ``repeats`` of ``calls`` steady calls (after one warm-up), and
  the repeats made: one when the warm-up call took over ``SLOW_CALL_S``."""
  start = time.perf_counter()
  state, _ = program(state, data)
  jax.block_until_ready(state)
  if time.perf_counter() - start > SLOW_CALL_S:
    repeats = 1
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      state, _ = program(state, data)
    jax.block_until_ready(state)
    rates.append(calls * steps_per_call / (time.perf_counter() - start))
  return statistics.median(rates), repeats


def check_forward(model, state, x) -> float:
  """Largest difference of the eval-mode logits between the two
  implementations, relative to their scale; raises above float32 rounding.

  The parameters are perturbed first: at initialization each block's last
  batch norm scales its branch by zero, which would leave its convolutions
  out of the logits.
  """
  leaves, tree = jax.tree.flatten(state["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  variables = {"params": params, "batch_stats": state["batch_stats"]}
  outputs = {}
  for impl in ("xla", "matmul"):
    with flax_convs(impl):
      forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
      outputs[impl] = np.asarray(forward(variables, x))
  scale = np.abs(outputs["xla"]).max()
  error = np.abs(outputs["matmul"] - outputs["xla"]).max() / scale
  if error > 1e-4:
    raise AssertionError(f"matmul forward differs from lax.conv by {error:.2e} of scale")
  return error


def measure(width: int, batch: int, steps: int, repeats: int) -> list[dict]:
  """Rows of steps/s for both implementations, straight-line and scanned."""
  model = ResNet18(num_classes=10, num_filters=width)
  tx = optax.sgd(0.1, momentum=0.9)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((SCAN_STEPS, batch, 32, 32, 3), np.float32)
  labels = rng.integers(0, 10, (SCAN_STEPS, batch)).astype(np.int32)
  batches = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  one = jax.tree.map(lambda a: a[0], batches)
  state = create_state(model, tx, one["image"])
  error = check_forward(model, state, one["image"])
  rows = []
  for impl in ("xla", "matmul"):
    for loop, data, per_call in (("step", one, 1), ("scan", batches, SCAN_STEPS)):
      train_step = make_train_step(model, tx)  # new functions: no trace reused
      fn = make_scan(train_step) if loop == "scan" else train_step
      program, compile_s = compile_program(fn, impl, state, data)
      rate, made = steps_per_second(program, state, data, -(-steps // per_call), per_call,
                                    repeats)
      rows.append(dict(width=width, batch=batch, impl=impl, loop=loop, rate=rate,
                       repeats=made, compile_s=compile_s, forward_error=error))
      print(f"  width {width} {impl} {loop}: {rate:.2f} steps/s ({made} repeats)", flush=True)
  return rows


def table(rows: list[dict]) -> str:
  """A markdown table: one line per width and loop, xla against matmul."""
  lines = ["| width | batch | loop | xla steps/s | matmul steps/s | speed-up | "
           "repeats (xla / matmul) | compile s (xla / matmul) | forward rel. diff |",
           "|---|---|---|---|---|---|---|---|---|"]
  for width in dict.fromkeys(r["width"] for r in rows):
    for loop in ("step", "scan"):
      xla, fast = (next(r for r in rows if (r["width"], r["loop"], r["impl"]) == (width, loop, i))
                   for i in ("xla", "matmul"))
      lines.append(f"| {width} | {xla['batch']} | {loop} | {xla['rate']:.2f} | "
                   f"{fast['rate']:.2f} | {fast['rate'] / xla['rate']:.2f}x | "
                   f"{xla['repeats']} / {fast['repeats']} | "
                   f"{xla['compile_s']:.1f} / {fast['compile_s']:.1f} | "
                   f"{xla['forward_error']:.1e} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="+", default=[16, 64],
                      help="ResNet num_filters (the first stage's channels)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=12, help="steady steps per repeat (>= 10)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  rows = []
  for width in args.widths:
    rows += measure(width, args.batch, max(args.steps, 10), args.repeats)
  print(f"\n{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, jax {jax.__version__}\n")
  print(table(rows))


if __name__ == "__main__":
  main()
