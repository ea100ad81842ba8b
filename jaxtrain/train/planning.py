"""What a run compiles and how its data reach the programs: the
:class:`~jaxtrain.engine.spec.ProgramSpec`, the execution mode (a scanned loop
or one straight-line step per call) and the feed: resident on the device, or
streamed from a :class:`~jaxtrain.data.Source` (:mod:`jaxtrain.engine.stream`)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jaxtrain.data.batching import num_batches
from jaxtrain.data.indexed import Source, as_source, head, length
from jaxtrain.engine import parallel
from jaxtrain.engine.feeds import DeviceFeed, Feed, fits_on_device
from jaxtrain.engine.spec import ProgramSpec
from jaxtrain.engine.stream import StreamFeed
from jaxtrain.train.config import MAX_SPAN_STEPS, EpochPlan, FitConfig
from jaxtrain.train.execution import choose_execution, runs_primitive


def program_spec(config: FitConfig, n_train: int, eval_sizes=(), best=None,
                 plateau=None) -> ProgramSpec:
  """The compiled programs' static description for a run of ``config``."""
  spe = num_batches(n_train, config.update_batch_size, config.drop_remainder)
  return ProgramSpec(
      num_train=n_train, batch_size=config.update_batch_size,
      accumulate=config.accumulate_steps,
      eval_batch_size=eval_batch_size(config, [n_train, *eval_sizes]),
      drop_remainder=config.drop_remainder, nonfinite=config.nonfinite,
      eval_every=config.eval_every_steps, best=best, plateau=plateau,
      conv_impl=config.conv_impl,
      max_steps=config.steps_per_call or spe * max(1, MAX_SPAN_STEPS // spe))


def eval_batch_size(config: FitConfig, sizes) -> int:
  """Evaluation batches: at least the training batch, no larger than the largest
  set, divisible by the devices."""
  size = config.eval_batch_size or max(config.batch_size, 1024)
  size = min(size, max(sizes))  # never pad a small set to a huge batch
  return -(-size // config.devices) * config.devices


def warn_per_device_batch_norm(state, config: FitConfig, example_inputs) -> None:
  """Warns when a run on several devices has batch norm whose statistics are
  not averaged across them (the model runs no collective over the data axis),
  naming its layers: each device would then normalise by its own shard."""
  if config.devices < 2 or not state.batch_stats:
    return
  model = state.model

  def forward(variables, x):
    key = jax.random.key(0)
    return model.apply(variables, x, train=True, mutable=("batch_stats",),
                       rngs=model.rngs(key, variables, x, train=True))

  jaxpr = jax.make_jaxpr(forward, axis_env=[(parallel.AXIS, config.devices)])(
      state.variables, example_inputs)
  if not runs_primitive(jaxpr.jaxpr, "psum"):
    layers = ", ".join(sorted(state.batch_stats))
    warnings.warn(
        f"batch norm in {layers} keeps per-device statistics on {config.devices} devices: "
        f"give it axis_name=jaxtrain.parallel.AXIS ({parallel.AXIS!r}) for the "
        "statistics of the global batch", stacklevel=3)


def warn_unmasked_batch_norm(state, config: FitConfig, n_train: int) -> None:
  """Warns once when a batch-norm model without ``mask=`` will see the padding
  rows of the ragged last batch of every epoch in its statistics."""
  ragged = n_train % config.update_batch_size and not config.drop_remainder
  if ragged and state.batch_stats and not state.passes_mask:
    layers = ", ".join(sorted(state.batch_stats))
    warnings.warn(
        f"the model's __call__ takes no mask=, so its batch norm ({layers}) "
        f"counts the {config.update_batch_size - n_train % config.update_batch_size} padding "
        "rows of each "
        "epoch's last batch: accept mask= (see docs/guides/own-model.md), or use "
        "drop_remainder=True", stacklevel=3)


def warn_low_precision_params(state) -> None:
  """Warns when the parameters themselves are in a 16-bit float: updates below
  their resolution are lost (the mixed-precision way keeps them float32)."""
  low = sorted({str(p.dtype) for p in jax.tree.leaves(state.params)
                if p.dtype in (jnp.bfloat16, jnp.float16)})
  if low:
    name = {"bfloat16": "bf16", "float16": "fp16"}[low[0]]
    warnings.warn(
        f"parameters in {', '.join(low)}: updates smaller than their resolution are "
        f"lost; keep float32 parameters and compute in {low[0]} with "
        f"create_train_state(..., precision='{name}')", stacklevel=3)


def plan_feed(state, train, config: FitConfig, *, val=None, test=None, augment=None,
              epochs: EpochPlan | None = None) -> Feed:
  """The feed (and so the compiled programs) a run of ``config`` trains through:
  on the device or streamed from the host, over ``config.devices`` devices, in
  the execution mode :func:`choose_execution` picks, with the epoch-end work
  ``epochs`` plans (the best epoch's parameters, ReduceLROnPlateau) on the device.

  ``train``, ``val`` and ``test`` are dicts of arrays or
  :class:`~jaxtrain.data.Source` objects. ``config.data="device"`` (or ``"auto"`` when
  they take under half the device's memory) reads a source whole and keeps it
  resident; ``"stream"`` reads the training rows step by step, and keeps an
  evaluation set resident when it fits, else streams it too."""
  mesh = (parallel.local_mesh(parallel.run_devices(config.devices))
          if config.devices > 1 else None)
  streamed = config.data in ("stream", "host") or (
      config.data == "auto" and not fits_on_device(train, val))
  if not streamed:
    train, val = (s.to_arrays() if isinstance(s, Source) else s for s in (train, val))
  elif config.eval_every_steps:
    raise ValueError(f"eval_every_steps needs the data on the device (data='device'), "
                     f"got data={config.data!r} with eval_every_steps={config.eval_every_steps}")
  evals = {"train": train} if config.evaluate_train else {}
  if val is not None:
    evals["val"] = val
  n_train = length(train)
  spec = program_spec(config, n_train, [length(s) for s in (val, test) if s is not None],
                      best=epochs.device_rule(evals) if epochs is not None else None,
                      plateau=epochs.plateau if epochs is not None else None)
  example = head(train, 1)["inputs"]
  # Read only if a measurement needs it (a streamed source reads from disk).
  straight = choose_execution(state, config, example,
                              lambda: head(train, config.batch_size)) == "step"
  warn_per_device_batch_norm(state, config, example)
  warn_unmasked_batch_norm(state, config, n_train)
  warn_low_precision_params(state)
  if not streamed:
    return DeviceFeed(spec, train, evals, augment=augment, mesh=mesh,
                      step_evals=bool(config.eval_every_steps), straight=straight)
  evals = {k: _streamed_eval(v, k == "train") for k, v in evals.items()}
  return StreamFeed(spec, as_source(train), evals, total_steps=config.epochs * spec.steps_per_epoch,
                    augment=augment, mesh=mesh, straight=straight)


def _streamed_eval(data, is_train: bool):
  """An evaluation set of a streamed run: resident when it fits on the device
  (and is not the streamed training set), else a source read batch by batch."""
  if is_train or not fits_on_device(data):
    return as_source(data)
  return data.to_arrays() if isinstance(data, Source) else data
