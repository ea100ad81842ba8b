"""The Flax NNX MNIST tutorial's CNN: jaxtrain.fit against the tutorial's own loop,
the same network in Linen through jaxtrain.fit, and PyTorch (issue 24).

    uv run python -m benchmarks.nnx_cnn [--repeats 5] [--epochs 1] [--profile]
    JAXTRAIN_TORCH_PYTHON=/tmp/torchenv/bin/python uv run python -m benchmarks.nnx_cnn

Data: the first 5984 (= 187 x 32) MNIST training images of ``$JAXTRAIN_MNIST_DIR``
(default ``../shared/data/mnist``) through ``jaxtrain.data.load_mnist`` and
``normalize_images`` ([0, 1], 28x28x1, 10 classes), or synthetic images of that
shape when the files are absent. Batch 32, ``optax.adamw(0.005, 0.9)`` (the
tutorial's), ``--epochs`` epochs per run (187 steps each), no evaluation.

Rows (the JAX rows in this one process, interleaved):

* ``fit_nnx``: ``tests.published.CNN`` (the tutorial's ``CNN`` pasted unchanged
  from flax ``docs_nnx/mnist_tutorial.md``) through ``jaxtrain.create_train_state``
  and ``jaxtrain.fit`` with ``FitConfig(batch_size=32, drop_remainder=True,
  progress=False, histogram_every=0, evaluate_train=False)``, defaults otherwise;
* ``tutorial``: the tutorial's loop as published: ``nnx.Optimizer(model,
  optax.adamw(...), wrt=nnx.Param)``, an ``nnx.MultiMetric`` (accuracy, average
  loss), ``train_model = nnx.view(model, deterministic=False,
  use_running_average=False)``, its ``loss_fn`` and ``@nnx.jit train_step``
  verbatim, called on numpy batches of the once-shuffled data (its
  ``make_batches``, minus the PIL decoding); the metrics are computed once at
  the end (the tutorial logs them every 200 steps);
* ``fit_linen``: the same layers written in Linen (:class:`LinenCNN`) through
  ``jaxtrain.fit`` with the same config;
* ``torch``: ``benchmarks/torch_baselines.py --workload nnx_cnn`` (the same
  net in eager PyTorch, 2 threads, AdamW lr 0.005 weight decay 1e-4, the
  lessons' loop), in-process when ``import torch`` works, else under
  ``$JAXTRAIN_TORCH_PYTHON``, else left out.

Timing, as ``benchmarks.run``: each run trains from a fresh model and optimizer
state built untimed just before it, from the same model and optimizer objects
(``create_train_state`` of the same module; the tutorial's objects built once and
reset to their initial state: a new tutorial ``CNN`` is a new graph to ``nnx.jit``
and to ``fit``, which then compile again, see :func:`tutorial_row`); a first run (end-to-end, compilation
included), a second, then ``--repeats`` more whose median is the steady-state
time; compile s = first - median. Unlike ``benchmarks.run`` (one process per
row) the three JAX rows share this process and take turns within every
repetition (the order rotating), so that each repetition's ratios
(fit / tutorial loop, fit NNX / fit Linen) compare runs made under the same load;
their medians are reported beside the ratio of the medians. PyTorch runs
afterwards in its own process. ``--profile`` adds a diagnostic row (the NNX
fit with ``conv_impl="xla"``: ``lax.conv`` as in the tutorial's loop, instead of
fit's CPU default of convolutions as matmuls) and, after the table, the time per
call and XLA cost analysis of each row's compiled step (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["JAXTRAIN_CACHE_DIR"] = "off"  # compile times are compile times

BATCH = 32
STEPS_PER_EPOCH = 187  # 5984 images
LEARNING_RATE, MOMENTUM = 0.005, 0.9  # the tutorial's optax.adamw(learning_rate, momentum)
TARGET_VS_TUTORIAL, TARGET_VS_LINEN = 1.5, 0.95


# ----------------------------------------------------------------------------
# Data and the Linen model.
# ----------------------------------------------------------------------------


def load_data():
  """``(inputs [N, 28, 28, 1] float32 in [0, 1], targets [N] int32, source)``."""
  import numpy as np

  import jaxtrain
  from benchmarks.workloads import MNIST_DIR

  n = STEPS_PER_EPOCH * BATCH
  if (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
    train = jaxtrain.data.load_mnist(MNIST_DIR, splits=("train",))["train"]
    x = jaxtrain.data.normalize_images(train["inputs"][:n])
    return x, np.asarray(train["targets"][:n], np.int32), f"MNIST ({MNIST_DIR})"
  rng = np.random.default_rng(0)
  return (rng.random((n, 28, 28, 1), np.float32), rng.integers(0, 10, n).astype(np.int32),
          "synthetic (MNIST files not found)")


def linen_cnn():
  import flax.linen as nn

  class LinenCNN(nn.Module):
    """The tutorial's CNN written in Linen: the same layers, initialisers' defaults
    and order (conv / dropout / batch norm / ReLU / 2x2 average pool, twice; dense
    256 / dropout / ReLU; dense 10)."""

    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Conv(32, (3, 3))(x)
      x = nn.Dropout(0.025, deterministic=not train)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
      x = nn.Conv(64, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
      x = x.reshape(x.shape[0], -1)
      x = nn.Dense(256)(x)
      x = nn.relu(nn.Dropout(0.025, deterministic=not train)(x))
      return nn.Dense(10)(x)

  return LinenCNN()


# ----------------------------------------------------------------------------
# Rows: setup() builds a fresh state untimed, run(args) trains, returns arrays.
# ----------------------------------------------------------------------------


def fit_row(model, x, y, epochs, conv_impl="auto"):
  import jax
  import optax

  import jaxtrain
  from jaxtrain import losses

  tx = optax.adamw(LEARNING_RATE, MOMENTUM)
  config = jaxtrain.FitConfig(epochs=epochs, batch_size=BATCH, drop_remainder=True,
                              progress=False, histogram_every=0, evaluate_train=False,
                              conv_impl=conv_impl)
  train = {"inputs": x, "targets": y}
  info = {}

  def setup():
    return jaxtrain.create_train_state(model, tx, jax.random.key(0), x[:1],
                                       loss_fn=losses.cross_entropy)

  def run(state):
    result = jaxtrain.fit(state, train, config=config, log=lambda _: None)
    info["history"] = result.history["epoch"]
    return result.state

  def final():
    return {k: v[-1] for k, v in info["history"].items()
            if v and isinstance(v[-1], float) and "loss" in k}

  return setup, run, final


def tutorial_row(x, y, epochs):
  """docs_nnx/mnist_tutorial.md, sections 4-7, as published (no evaluation)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from tests.published import CNN

  order = np.random.default_rng(0).permutation(len(y))  # train_ds.shuffle(seed=0)
  x, y = x[order], y[order]
  learning_rate, momentum, batch_size = LEARNING_RATE, MOMENTUM, BATCH

  def make_batches(images, labels, batch_size):
    """Yield batches of normalized (image, label) numpy arrays."""
    for i in range(0, len(labels), batch_size):
      if len(labels[i : i + batch_size]) < batch_size:  # drop incomplete final batch
        break
      yield {'image': images[i : i + batch_size], 'label': labels[i : i + batch_size]}

  # --- the tutorial's section 5, verbatim ---
  def loss_fn(model: CNN, batch, rngs: nnx.Rngs | None = None):
    logits = model(batch['image'], rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(
      logits=logits, labels=batch['label']
    ).mean()
    return loss, logits

  @nnx.jit
  def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, rngs: nnx.Rngs, batch):  # noqa: E501
    """Train for a single step."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
    optimizer.update(model, grads)  # In-place updates.
  # ---

  info, built = {}, {}

  def setup():
    """The tutorial's objects, built once; later runs reset them to their initial
    state. (A new ``CNN`` instance is a new graph for ``nnx.jit``: its
    ``self.avg_pool = partial(...)`` attribute compares by identity, so every
    instance retraces and recompiles ``train_step``, ~3 s here.)"""
    if not built:
      model = CNN(rngs=nnx.Rngs(0))
      optimizer = nnx.Optimizer(
        model, optax.adamw(learning_rate, momentum), wrt=nnx.Param
      )
      metrics = nnx.MultiMetric(
        accuracy=nnx.metrics.Accuracy(),
        loss=nnx.metrics.Average('loss'),
      )
      train_model = nnx.view(model, deterministic=False, use_running_average=False)
      built["objects"] = model, train_model, optimizer, metrics
      built["initial"] = jax.tree.map(  # arrays, not the live variables
          jnp.copy, nnx.to_pure_dict(nnx.state((model, optimizer, metrics))))
    else:
      model, _, optimizer, metrics = built["objects"]
      state = nnx.state((model, optimizer, metrics))
      nnx.replace_by_pure_dict(state, built["initial"])
      nnx.update((model, optimizer, metrics), state)
    return built["objects"]

  def run(objects):
    model, train_model, optimizer, metrics = objects
    rngs = nnx.Rngs(0)
    for _ in range(epochs):
      for batch in make_batches(x, y, batch_size):
        train_step(train_model, optimizer, metrics, rngs, batch)
    info["metrics"] = metrics.compute()
    metrics.reset()
    return info["metrics"], nnx.state(model)

  def final():
    return {"train_loss (running)": float(info["metrics"]["loss"])}

  return setup, run, final, train_step


def _timed(run, setup) -> float:
  import jax
  args = setup()
  jax.block_until_ready(jax.tree.leaves(args))
  started = time.perf_counter()
  jax.block_until_ready(run(args))
  return time.perf_counter() - started


# ----------------------------------------------------------------------------
# PyTorch.
# ----------------------------------------------------------------------------


def run_torch(x, y, repeats, epochs) -> dict:
  import numpy as np

  from benchmarks import run as bench_run
  how = bench_run._torch_command()
  if how is None:
    return {"error": "PyTorch not available (pip install torch, or set JAXTRAIN_TORCH_PYTHON)"}
  if epochs != 1:
    return {"error": "the PyTorch recipe trains 1 epoch (torch_baselines WORKLOADS['nnx_cnn'])"}
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "nnx_cnn.npz")
    np.savez(data, train_inputs=x, train_targets=y)
    if how == "in-process":
      from benchmarks import torch_baselines
      return torch_baselines.run("nnx_cnn", {"train_inputs": x, "train_targets": y},
                                 repeats, threads=2)
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see BENCHMARKS.md: PyTorch threads
    proc = subprocess.run(
        how + [str(pathlib.Path(__file__).with_name("torch_baselines.py")), "--workload",
               "nnx_cnn", "--data", data, "--repeats", str(repeats), "--threads", "2"],
        env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode:
    return {"error": f"exit {proc.returncode}: " + proc.stderr.strip()[-300:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Profile: one step of each row, device time and XLA cost analysis.
# ----------------------------------------------------------------------------


def profile(rows, x, y, tutorial_step, steps=50, rounds=7) -> list[str]:
  """Per-step wall time and XLA's cost analysis of each row's step program on one
  resident batch: ``jaxtrain.train_step`` under ``jax.jit`` for the fit rows
  (convolutions as matmuls, as fit runs them on CPU, or as ``lax.conv``), called
  once per step from Python or ``steps`` times inside one ``lax.fori_loop`` (the
  compute floor of fit's looped programs), that loop also lowered as fit lowers
  its programs (``jaxtrain.cpu_random.fast_random_bits``); the tutorial's ``nnx.jit``
  ``train_step`` with a numpy batch (as its loop calls it), the same function as
  one ``jax.jit`` of split state (no ``nnx.jit`` graph work per call), and in a
  ``fori_loop`` of 5 (``lax.conv`` in a loop). The programs take turns for
  ``rounds`` rounds; medians."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxtrain
  from jaxtrain.nn import conv, cpu_random

  batch = {"inputs": jnp.asarray(x[:BATCH]), "targets": jnp.asarray(y[:BATCH])}
  key = jax.random.key(1)
  programs = {}  # label -> (call, carry, cost, calls per round, steps per call)

  def cost(compiled):
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return (f'{c.get("flops", float("nan")) / 1e9:.3f} | '
            f'{c.get("bytes accessed", float("nan")) / 1e6:.0f} | '
            f'{compiled.as_text().count(" convolution(")}')

  def step_loop(s):
    return jax.lax.fori_loop(0, steps, lambda i, s: jaxtrain.train_step(
        s, batch, jax.random.fold_in(key, i))[0], s)

  for name in ("fit_nnx", "fit_linen"):
    for impl, looped, fast in (("matmul", False, False), ("xla", False, False),
                               ("matmul", True, False), ("matmul", True, True)):
      state = rows[name][0]()
      # A new function per program: jax caches traces by function, and the conv
      # swap is a context, not an argument.
      step = jax.jit(lambda s, b, k: jaxtrain.train_step(s, b, k)[0])
      with conv.flax_convs(impl), cpu_random.fast_random_bits(fast):
        if looped:
          compiled = jax.jit(lambda s: step_loop(s)).lower(state).compile()
          call = compiled
        else:
          compiled = step.lower(state, batch, key).compile()
          call = functools.partial(lambda s, c: c(s, batch, key), c=compiled)
      label = (f"{name}: fori_loop of {steps} x jaxtrain.train_step, {impl} convs"
               if looped else f"{name}: jit(jaxtrain.train_step) per step, {impl} convs")
      label += ", dropout masks drawn once (fit's fast_random_bits)" if fast else ""
      programs[label] = (call, state, cost(compiled), 1 if looped else steps,
                         steps if looped else 1)

  model, train_model, optimizer, metrics = rows["tutorial"][0]()
  np_batch = {"image": x[:BATCH], "label": y[:BATCH]}
  rngs = nnx.Rngs(0)
  programs["tutorial: its nnx.jit train_step per step, numpy batch (as its loop)"] = (
      lambda c: (tutorial_step(train_model, optimizer, metrics, rngs, np_batch),
                 optimizer.step[...])[1], 0, "- | - | -", steps, 1)
  inner = getattr(tutorial_step, "fun", None) or getattr(tutorial_step, "__wrapped__", None)
  if inner is not None:
    graphdef, state = nnx.split((train_model, optimizer, metrics, rngs))
    jbatch = {"image": jnp.asarray(x[:BATCH]), "label": jnp.asarray(y[:BATCH])}

    def pure(state):
      objs = nnx.merge(graphdef, state)
      inner(*objs, jbatch)
      return nnx.state(objs)

    compiled = jax.jit(pure).lower(state).compile()
    programs["tutorial: its train_step as one jax.jit of split state, per step"] = (
        compiled, state, cost(compiled), steps, 1)
    compiled = jax.jit(lambda s: jax.lax.fori_loop(0, 5, lambda i, s: pure(s), s)).lower(
        state).compile()
    programs["tutorial: its train_step in a fori_loop of 5 (lax.conv in a loop)"] = (
        compiled, jax.tree.map(jnp.copy, state), cost(compiled), 1, 5)

  carries = {label: jax.block_until_ready(p[0](p[1])) for label, p in programs.items()}
  times = {label: [] for label in programs}
  for _ in range(rounds):
    for label, (call, _, _, calls, per_call) in programs.items():
      carry = carries[label]
      started = time.perf_counter()
      for _ in range(calls):
        carry = call(carry)
      carries[label] = jax.block_until_ready(carry)
      times[label].append((time.perf_counter() - started) / (calls * per_call) * 1e3)
  lines = [f"| step program (one batch of {BATCH}) | ms/step | GFLOP/step (XLA; a loop body once) "
           "| bytes accessed MB/step (XLA) | convolution ops in the HLO |",
           "|---|---|---|---|---|"]
  for label, p in programs.items():
    lines.append(f"| {label} | {statistics.median(times[label]):.2f} | {p[2]} |")
  return lines


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def _fmt(v):
  from benchmarks.report import _fmt as fmt
  return fmt(v)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed runs per row after the first and second (median)")
  parser.add_argument("--epochs", type=int, default=1, help="epochs (187 steps) per run")
  parser.add_argument("--no-torch", action="store_true", help="leave the PyTorch row out")
  parser.add_argument("--profile", action="store_true",
                      help="also a fit row with conv_impl=\"xla\", and each row's compiled "
                           "step timed alone (+ XLA cost analysis)")
  parser.add_argument("--json", default=None, help="also write raw timings as JSON")
  args = parser.parse_args(argv)
  started_all = time.perf_counter()
  load_start = os.getloadavg()

  import flax
  import jax
  from flax import nnx

  from benchmarks.timing import CompileCounter
  from tests.published import CNN

  counter = CompileCounter()
  x, y, source = load_data()
  steps = args.epochs * (len(y) // BATCH)
  rows = {
      "fit_nnx": fit_row(CNN(rngs=nnx.Rngs(0)), x, y, args.epochs),
      "tutorial": tutorial_row(x, y, args.epochs),
      "fit_linen": fit_row(linen_cnn(), x, y, args.epochs),
  }
  if args.profile:
    rows["fit_nnx_xla"] = fit_row(CNN(rngs=nnx.Rngs(0)), x, y, args.epochs,
                                  conv_impl="xla")
  tutorial_step = rows["tutorial"][3]
  labels = {
      "fit_nnx": "jaxtrain.fit, tutorial CNN (NNX, tests.published.CNN)",
      "tutorial": "the tutorial's loop (nnx.jit train_step, nnx.Optimizer, MultiMetric)",
      "fit_linen": "jaxtrain.fit, the same CNN in Linen",
      "fit_nnx_xla": "(diagnostic) jaxtrain.fit, tutorial CNN, conv_impl=\"xla\"",
      "torch": "PyTorch eager (2 threads)",
  }
  names = list(rows)
  results = {n: {"times": [], "compiles": []} for n in names}
  loads = []
  # First run (compile included) and second run of each row, then the repetitions.
  for phase in ("first_s", "second_s"):
    for name in names:
      before = counter.count
      results[name][phase] = _timed(rows[name][1], rows[name][0])
      results[name]["compiles_" + phase.split("_")[0]] = counter.count - before
  for rep in range(args.repeats):
    loads.append(os.getloadavg()[0])
    for i in range(len(names)):
      name = names[(rep + i) % len(names)]
      before = counter.count
      results[name]["times"].append(_timed(rows[name][1], rows[name][0]))
      results[name]["compiles"].append(counter.count - before)
    print(f"  rep {rep + 1}: " + ", ".join(f"{n} {results[n]['times'][-1]:.3f} s"
                                           for n in names)
          + f" (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
  loads.append(os.getloadavg()[0])
  for name in names:
    results[name]["final"] = rows[name][2]()

  torch_result = None
  if not args.no_torch:
    torch_result = run_torch(x, y, args.repeats, args.epochs)
    if "error" not in torch_result:
      loads.append(os.getloadavg()[0])

  profile_lines = profile(rows, x, y, tutorial_step) if args.profile else []

  # --- report ---
  med = {n: statistics.median(results[n]["times"]) for n in names}
  per_rep = {
      "fit_nnx / tutorial": [t / f for f, t in zip(results["fit_nnx"]["times"],
                                                   results["tutorial"]["times"])],
      "fit_nnx / fit_linen": [l / f for f, l in zip(results["fit_nnx"]["times"],
                                                    results["fit_linen"]["times"])],
  }
  out = [
      f"- Data: {source}, {len(y)} images, batch {BATCH}, {steps} steps per run "
      f"({args.epochs} epoch{'s' if args.epochs > 1 else ''}), optax.adamw({LEARNING_RATE}, "
      f"{MOMENTUM}), no evaluation",
      f"- Versions: jax {jax.__version__}, flax {flax.__version__}, Python "
      f"{sys.version.split()[0]}"
      + (f", torch {torch_result['versions']['torch']}" if torch_result
         and "versions" in torch_result else ""),
      f"- Load average (1 min): {load_start[0]:.1f} at start, "
      f"{min(loads):.1f} - {max(loads):.1f} during the repetitions",
      f"- {args.repeats} repetitions (medians); JAX rows interleaved in one process",
      "",
      "| row | steps/s | examples/s | compile s | end-to-end s (1st run) | steady s (median) "
      "| 2nd run s | compiles (1st / later runs) | vs tutorial loop |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  all_rows = dict(results)
  if torch_result is not None:
    all_rows["torch"] = torch_result
  for name, r in all_rows.items():
    if "error" in r:
      out.append(f"| {labels[name]} | {r['error']} |" + " |" * 7)
      continue
    steady = statistics.median(r["times"])
    rate = steps / steady
    compiles = (f"{r['compiles_first']} / {sum(r['compiles']) + r['compiles_second']}"
                if "compiles" in r else "-")
    out.append(f"| {labels[name]} | {_fmt(rate)} | {_fmt(rate * BATCH)} | "
               f"{_fmt(r['first_s'] - steady)} | {_fmt(r['first_s'])} | {_fmt(steady)} | "
               f"{_fmt(r['second_s'])} | {compiles} | {med['tutorial'] / steady:.2f}x |")
  out += ["", "| ratio (steps/s) | per repetition | median of those | ratio of medians "
          "| target | |", "|---|---|---|---|---|---|"]
  for (key, ratios), target, of_medians in zip(
      per_rep.items(), (TARGET_VS_TUTORIAL, TARGET_VS_LINEN),
      (med["tutorial"] / med["fit_nnx"], med["fit_linen"] / med["fit_nnx"])):
    m = statistics.median(ratios)
    out.append(f"| {key} | {', '.join(f'{v:.2f}' for v in ratios)} | {m:.2f}x | "
               f"{of_medians:.2f}x | >= {target}x | {'met' if m >= target else 'NOT met'} |")
  out += ["", "Final running training loss of the last run: " + "; ".join(
      f"{n} " + ", ".join(f"{k} {v:.3f}" for k, v in results[n]["final"].items())
      for n in names) + (f"; torch {torch_result['final'].get('running_loss', float('nan')):.3f}"
                         if torch_result and "final" in torch_result else "")]
  if profile_lines:
    out += ["", *profile_lines]
  out.append(f"\nTotal time: {time.perf_counter() - started_all:.0f} s.")
  print("\n".join(out))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"rows": all_rows, "per_repetition": per_rep, "loads": loads}, indent=1, default=str))


if __name__ == "__main__":
  main()
