"""Benchmarks: jaxtrain against a per-step ``jax.jit`` loop and PyTorch.

    uv run python -m benchmarks.run [--only NAME ...] [--repeats N] [--out BENCHMARKS.md]

Every row runs in a fresh worker process (``--worker WORKLOAD:ROW``), so its
peak RSS and its compile time are its own. A worker times the workload's first
run (compile included: "end-to-end s"), a second identical run, then
``--repeats`` more whose median is the steady-state time; "compile s" is the
first run minus that median. Rates use the steady-state time of the whole
workload (training and its evaluations): steps/s = training steps / time,
examples/s = steps/s * batch size.

A second call of the same workload reuses the library's compiled programs
(``jaxtrain.program`` shares them between runs of the same setup); "2nd run s"
times it and notes the compilations it needed, if any.

PyTorch rows run ``benchmarks/torch_baselines.py`` in-process in a worker of
this interpreter when it can ``import torch``, else under
``$JAXTRAIN_TORCH_PYTHON``; without either they are left out with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
MNIST_DIR = pathlib.Path(os.environ.get("JAXTRAIN_MNIST_DIR", ROOT.parent / "shared/data/mnist"))
SEEDS = 16
MLP_STEPS = 40
CNN_STEPS = 16
CNN_ISSUE_STEPS = 8
# lax.conv inside jaxtrain's programs runs ~1.5 s a step on this CPU (see
# BENCHMARKS.md); those rows time fewer steps to keep the run under 10 minutes.
CNN_XLA_STEPS = 2
MATMUL_N = 2048
WORKER_TIMEOUT_S = 600


# ----------------------------------------------------------------------------
# Workloads and their rows.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  key: str
  label: str
  kind: str  # fit | baseline | torch | many | fit_seq | cli | compiles
  options: tuple = ()

  def opt(self, name, default=None):
    return dict(self.options).get(name, default)


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  title: str
  description: str
  rows: tuple[Row, ...]
  must: str
  reference: str  # the issue's numbers (CEO's machine)


def _fit(key, label, **options):
  return Row(key, label, "fit", tuple(sorted(options.items())))


def _torch(key="torch", threads=2, label=None, **options):
  return Row(key, label or f"PyTorch ({threads} thread{'s' if threads > 1 else ''})",
             "torch", tuple(sorted({"threads": threads, **options}.items())))


_SMALL_ROWS = (
    _fit("fit", "jaxtrain fit (default execution)"),
    _fit("fit_step", "jaxtrain fit, execution=\"step\"", execution="step"),
    Row("jit", "per-step jax.jit loop (Flax-examples style)", "baseline"),
    _torch(threads=2),
    _torch("torch1", threads=1),
)

WORKLOADS = {w.name: w for w in (
    Workload(
        "two_moons", "two moons: 100 epochs + full eval each epoch",
        "MLP 2-16-2, SGD 0.1 momentum 0.9, batch 32, 800 train / 200 val; every epoch "
        "evaluates the whole training and validation sets (2500 steps).",
        _SMALL_ROWS, "jaxtrain fast path >= 8x the per-step jit loop (steady state)",
        "PyTorch 0.567 s / per-step jit 0.133 s / Keras 0.467 s / one lax.scan 0.022 s"),
    Workload(
        "pigeon", "pigeon: 15 epochs, eval each epoch",
        "MNIST digit < 3: 1024 train / 1024 val images, MLP 784-30-1, BCE, SGD 0.005 "
        "momentum 0.9, batch 32; train and val evaluated every epoch (480 steps).",
        _SMALL_ROWS, "jaxtrain fast path >= 2x the per-step jit loop",
        "PyTorch 0.140 s / per-step jit 0.046 s / Keras 0.122 s / one lax.scan 0.029 s"),
    Workload(
        "pigeon_every_step", "pigeon with train + val accuracy every iteration",
        "As pigeon, plus the whole training and validation sets (1024 + 1024 images) "
        "evaluated after every step (FitConfig(eval_every_steps=1)); 480 steps, 960 "
        "evaluations.",
        (_fit("fit", "jaxtrain fit (default execution)", eval_every=1),
         _fit("fit_step", "jaxtrain fit, execution=\"step\"", execution="step",
              eval_every=1),
         Row("jit", "per-step jax.jit loop (Flax-examples style)", "baseline"),
         _torch(threads=2), _torch("torch1", threads=1)),
        "jaxtrain fast path >= 3x PyTorch",
        "PyTorch 0.616 s / per-step jit 0.415 s / Keras 0.516 s / one lax.scan 0.198 s"),
    Workload(
        "mlp", "MLP 784-1024-1024-10, batch 256, AdamW",
        f"Synthetic data, {MLP_STEPS} steps (one epoch of {256 * MLP_STEPS} examples), no "
        "evaluation. FLOPs/step = 6 * 256 * (784*1024 + 1024*1024 + 1024*10) = 2.88 GFLOP. "
        f"Peak reference: a jitted {MATMUL_N}x{MATMUL_N} @ {MATMUL_N}x{MATMUL_N} float32 "
        "matmul timed in the same worker, interleaved with the repetitions.",
        (_fit("fit", "jaxtrain fit (default execution)"),
         _fit("fit_step", "jaxtrain fit, execution=\"step\"", execution="step"),
         Row("jit", "per-step jax.jit loop (Flax-examples style)", "baseline"),
         _torch(threads=2)),
        ">= 85% of the measured fp32 matmul rate",
        "PyTorch 182 GFLOP/s / per-step jit 332 / scan 415; fp32 matmul peak 488"),
    Workload(
        "cnn", "CNN, batch 128: jaxtrain's models.CNN(features=(32, 64), dense=128)",
        f"28x28x1 synthetic images, {CNN_STEPS} steps per run, SGD 0.01 momentum 0.9, no "
        "evaluation. Architecture as the library builds it: per block 3x3 SAME conv "
        "(no bias) / batch norm / ReLU / 2x2 max-pool, then dense 128 and 10 (conv2 "
        "runs at 14x14, dense input 7*7*64). The baseline and PyTorch build the same net.",
        (_fit("fit", "jaxtrain fit (default: step + matmul conv on CPU)"),
         _fit("fit_matmul_scan", "jaxtrain fit, matmul conv, scan", conv="matmul",
              execution="scan"),
         _fit("fit_xla_step", f"jaxtrain fit, xla conv, step ({CNN_XLA_STEPS} steps/run)",
              conv="xla", execution="step", steps=CNN_XLA_STEPS),
         _fit("fit_xla_scan", f"jaxtrain fit, xla conv, scan ({CNN_XLA_STEPS} steps/run)",
              conv="xla", execution="scan", steps=CNN_XLA_STEPS),
         Row("jit", "per-step jax.jit loop (Flax-examples style, lax.conv)", "baseline"),
         _torch(threads=2), _torch("torch1", threads=1)),
        "jaxtrain >= 1.0x PyTorch steps/s",
        "PyTorch 18.3 steps/s / per-step jit 5.1 / scan 0.57 (5.2 unrolled)"),
    Workload(
        "cnn_issue", "CNN, batch 128: the issue's conv32-conv64-pool-dense128",
        f"PyTorch's examples/mnist Net without dropout: two 3x3 VALID convs with ReLU, ONE "
        f"2x2 max-pool, dense 128, head 10 (28->26->24->12, dense input 9216), no batch "
        f"norm; {CNN_ISSUE_STEPS} steps per run, SGD 0.01 momentum 0.9. jaxtrain cannot "
        "build this net (its CNN pools after every block and pads SAME), so the jaxtrain "
        "rows train benchmarks.baselines.IssueCNN (matmul convs) through jaxtrain.fit; "
        "the xla-conv jaxtrain row is left out (it ran > 600 s: lax.conv inside the "
        "scanned program, as in the cnn table).",
        (_fit("fit_matmul_step", "jaxtrain fit (IssueCNN, matmul conv, step)",
              model="issue", conv="matmul", execution="step"),
         _fit("fit_matmul_scan", "jaxtrain fit (IssueCNN, matmul conv, scan)",
              model="issue", conv="matmul", execution="scan"),
         Row("jit", "per-step jax.jit loop (Flax-examples style, lax.conv)", "baseline",
             (("model", "issue"),)),
         _torch(threads=2), _torch("torch1", threads=1)),
        "jaxtrain >= 1.0x PyTorch steps/s",
        "PyTorch 18.3 steps/s / per-step jit 5.1 / scan 0.57 (5.2 unrolled)"),
    Workload(
        "seeds", f"{SEEDS} seeds of two moons in one vmapped program",
        f"two moons as above (each seed its own data, init and shuffle, as "
        f"`experiments.two_moons --seeds {SEEDS}`), 100 epochs, eval every epoch. "
        f"Throughput = models x steps / s.",
        (Row("many", f"jaxtrain.many.fit_many ({SEEDS} seeds, one program)", "many"),
         Row("fit_seq", f"{SEEDS} x jaxtrain fit in a row", "fit_seq")),
        "fit_many >= 8x the throughput of fits in a row", ""),
    Workload(
        "cli", "python -m experiments.two_moons, end to end",
        "Subprocess wall time of the whole command (interpreter start, imports, data, "
        "run directory, 100 epochs, metrics/curves/checkpoint files) with a warm "
        "persistent compilation cache (JAXTRAIN_CACHE_DIR=<tmp>, warmed by one run); "
        "the first (cold-cache) run is the end-to-end column. Compilations are counted "
        "in fresh processes without the persistent cache.",
        (Row("cli", "python -m experiments.two_moons (warm cache)", "cli"),
         Row("compiles", "XLA compilations, 10 vs 100 epochs", "compiles")),
        "< 2.5 s; compilations do not grow with epochs", ""),
)}


# ----------------------------------------------------------------------------
# Worker side: data, models, timing.
# ----------------------------------------------------------------------------


def _load():
  return os.getloadavg()[0]


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _num_train(workload: str, row: Row | None = None) -> int:
  if workload in ("two_moons", "seeds", "cli"):
    return 800
  if workload.startswith("pigeon"):
    return 1024
  if workload == "mlp":
    return 256 * MLP_STEPS
  default = CNN_STEPS if workload == "cnn" else CNN_ISSUE_STEPS
  return 128 * ((row.opt("steps") if row is not None else None) or default)


def _data(workload: str, row: Row | None = None):
  """``(train, val)`` numpy arrays of a workload (val None when not evaluated)."""
  import numpy as np

  if workload in ("two_moons", "seeds", "cli"):
    from experiments import two_moons as tm
    return tm.load_data(tm.Config())
  if workload.startswith("pigeon"):
    from jaxtrain import datasets
    mnist = datasets.load_mnist_idx(MNIST_DIR)["train"]
    x = (mnist["inputs"][:2048].astype(np.float32) / 255.0).reshape(2048, -1)
    y = (mnist["targets"][:2048] < 3).astype(np.int32)
    return ({"inputs": x[:1024], "targets": y[:1024]},
            {"inputs": x[1024:], "targets": y[1024:]})
  rng = np.random.default_rng(0)
  if workload == "mlp":
    n = 256 * MLP_STEPS
    return ({"inputs": rng.standard_normal((n, 784), np.float32),
             "targets": rng.integers(0, 10, n).astype(np.int32)}, None)
  n = _num_train(workload, row)
  return ({"inputs": rng.random((n, 28, 28, 1), np.float32),
           "targets": rng.integers(0, 10, n).astype(np.int32)}, None)


# Per workload: epochs, batch size, optimizer, loss.
SETTINGS = {
    "two_moons": dict(epochs=100, batch=32, opt=("sgd", 0.1), loss="ce"),
    "seeds": dict(epochs=100, batch=32, opt=("sgd", 0.1), loss="ce"),
    "pigeon": dict(epochs=15, batch=32, opt=("sgd", 0.005), loss="bce"),
    "pigeon_every_step": dict(epochs=15, batch=32, opt=("sgd", 0.005), loss="bce"),
    "mlp": dict(epochs=1, batch=256, opt=("adamw", 1e-3), loss="ce"),
    "cnn": dict(epochs=1, batch=128, opt=("sgd", 0.01), loss="ce"),
    "cnn_issue": dict(epochs=1, batch=128, opt=("sgd", 0.01), loss="ce"),
}


def _jaxtrain_model(workload: str, row: Row):
  from jaxtrain import models
  from benchmarks import baselines

  if workload in ("two_moons", "seeds"):
    return models.MLP(hidden_sizes=(16,), outputs=2)
  if workload.startswith("pigeon"):
    return models.Pigeon(30, init_style="torch")
  if workload == "mlp":
    return models.MLP(hidden_sizes=(1024, 1024), outputs=10)
  if row.opt("model") == "issue":
    return baselines.IssueCNN(impl=row.opt("conv", "xla"))
  return models.CNN(features=(32, 64), dense=128, conv_impl=row.opt("conv", "auto"))


def _jaxtrain_tx(workload: str):
  import jaxtrain

  kind, lr = SETTINGS[workload]["opt"]
  if kind == "sgd":
    return jaxtrain.make_optimizer("sgd", lr, momentum=0.9)
  return jaxtrain.make_optimizer("adamw", lr, weight_decay=0.01)


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events)."""

  def __init__(self):
    import jax
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def _timed(fn: Callable[..., Any], setup: Callable[[], Any] | None = None) -> float:
  """Seconds of ``fn()``, or of ``fn(setup())`` with ``setup`` untimed.

  ``setup`` builds the fresh model and optimizer state a run trains from: every
  row times training, not parameter initialisation (for the 1.9M-parameter MLP
  that is ~12 ms of threefry draws, 3% of its run).
  """
  import jax
  args = () if setup is None else (jax.block_until_ready(setup()),)
  started = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - started


def _matmul_timer():
  """Returns ``measure()`` -> seconds of one 2048^3 float32 matmul (min of 3)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (MATMUL_N, MATMUL_N), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))

  def measure():
    return min(_timed(lambda: matmul(a, b)) for _ in range(3))

  return measure


def _repeat(run, repeats: int, between=None, setup=None) -> dict:
  """First run, second run, then ``repeats`` more (``between()`` before each);
  ``run(setup())`` with the setup untimed when ``setup`` is given."""
  first = _timed(run, setup)
  second = _timed(run, setup)
  times, extra = [], []
  for _ in range(repeats):
    if between is not None:
      extra.append(between())
    times.append(_timed(run, setup))
  return {"first_s": first, "second_s": second, "times": times, "between": extra}


def _fit_config(workload: str, row: Row, **changes):
  import jaxtrain
  s = SETTINGS[workload]
  return jaxtrain.FitConfig(
      epochs=s["epochs"], batch_size=s["batch"], execution=row.opt("execution", "auto"),
      eval_every_steps=row.opt("eval_every", 0), evaluate_train=workload not in (
          "mlp", "cnn", "cnn_issue"), progress=False, **changes)


def work_fit(workload: str, row: Row, repeats: int) -> dict:
  import jax
  import jaxtrain
  from jaxtrain import losses

  counter = CompileCounter()
  train, val = _data(workload, row)
  model, tx = _jaxtrain_model(workload, row), _jaxtrain_tx(workload)
  loss_fn = losses.binary_cross_entropy_with_logits if SETTINGS[workload]["loss"] == "bce" \
      else losses.cross_entropy
  config = _fit_config(workload, row)
  example = train["inputs"][:1]
  result = {}

  def setup():
    return jaxtrain.create_train_state(model, tx, jax.random.key(0), example, loss_fn=loss_fn)

  def run(state):
    out = jaxtrain.fit(state, train, val=val, config=config, log=lambda _: None)
    result["last"] = out.history["epoch"]
    return out.state

  measure = _matmul_timer() if workload == "mlp" else None
  first = _timed(run, setup)
  compiles_first = counter.count
  before = counter.count
  second = _timed(run, setup)
  compiles_second = counter.count - before
  before = counter.count
  times, peaks = [], []
  for _ in range(repeats):
    if measure is not None:
      peaks.append(measure())
    times.append(_timed(run, setup))
  compiles_steady = counter.count - before
  from jaxtrain.loop import choose_execution
  state = jaxtrain.create_train_state(model, tx, jax.random.key(0), example, loss_fn=loss_fn)
  last = {k: v[-1] for k, v in result["last"].items() if v and isinstance(v[-1], float)}
  return {"first_s": first, "second_s": second, "times": times, "matmul_s": peaks,
          "compiles_first": compiles_first, "compiles_second": compiles_second,
          "compiles_steady": compiles_steady,
          "execution": choose_execution(state, config),
          "final": {k: last[k] for k in ("train_loss", "val_accuracy") if k in last}}


def work_baseline(workload: str, row: Row, repeats: int) -> dict:
  import optax
  from benchmarks import baselines

  train, val = _data(workload)
  s = SETTINGS[workload]
  if workload == "two_moons":
    model = baselines.MLP((16, 2))
  elif workload.startswith("pigeon"):
    model = baselines.MLP((30, 1))
  elif workload == "mlp":
    model = baselines.MLP((1024, 1024, 10))
  elif workload == "cnn":
    model = baselines.CNN()
  else:
    model = baselines.IssueCNN("xla")
  kind, lr = s["opt"]
  tx = (optax.sgd(lr, momentum=0.9) if kind == "sgd"
        else optax.adamw(lr, weight_decay=0.01))
  evals = {"train": train, "val": val} if val is not None else {}
  result = {}

  def setup():
    return baselines.create_state(model, tx, 0, train["inputs"][:1])

  def run(state):
    state, history = baselines.train(
        state, train, epochs=s["epochs"], batch_size=s["batch"], loss=s["loss"],
        evals=evals, eval_every_step=workload == "pigeon_every_step")
    result["last"] = history[-1]
    return state

  measure = _matmul_timer() if workload == "mlp" else None
  out = _repeat(run, repeats, measure, setup)
  out["matmul_s"] = out.pop("between")
  out["final"] = {k: v for k, v in result["last"].items()
                  if k in ("running_loss", "val_accuracy")}
  return out


def _torch_data_file(workload: str, directory: str) -> str:
  import numpy as np
  train, val = _data(workload)
  arrays = {f"train_{k}": v for k, v in train.items()}
  if val is not None:
    arrays.update({f"val_{k}": v for k, v in val.items()})
  path = os.path.join(directory, f"{workload}.npz")
  np.savez(path, **arrays)
  return path


def work_torch(workload: str, row: Row, repeats: int) -> dict:
  """In-process (this interpreter has torch); the runner never calls this otherwise."""
  from benchmarks import torch_baselines
  import numpy as np

  with tempfile.TemporaryDirectory() as tmp:
    with np.load(_torch_data_file(workload, tmp)) as data:
      arrays = {k: data[k] for k in data.files}
  return torch_baselines.run(workload, arrays, repeats, threads=row.opt("threads", 2))


def _seed_data():
  from experiments import two_moons as tm
  from jaxtrain import many
  configs = [tm.Config(seed=s) for s in range(SEEDS)]
  data = [tm.load_data(c) for c in configs]
  return configs, data, many


def work_many(workload: str, row: Row, repeats: int) -> dict:
  import jax
  import jaxtrain
  from jaxtrain import losses

  counter = CompileCounter()
  configs, data, many = _seed_data()
  train = many.stack([d[0] for d in data])
  val = many.stack([d[1] for d in data])
  model, tx = _jaxtrain_model("seeds", row), _jaxtrain_tx("seeds")
  config = jaxtrain.FitConfig(epochs=100, batch_size=32, progress=False)
  seeds = list(range(SEEDS))
  result = {}

  def setup():
    return many.stack([
        jaxtrain.create_train_state(model, tx, jax.random.key(s), jax.numpy.zeros((1, 2)),
                                    loss_fn=losses.cross_entropy) for s in seeds])

  def run(states):
    out = many.fit_many(states, train, val=val, seeds=seeds, member_data=True,
                        config=config)
    result["acc"] = out.final("val_accuracy")
    return out.state

  first = _timed(run, setup)
  before = counter.count
  second = _timed(run, setup)
  compiles_second = counter.count - before
  times = [_timed(run, setup) for _ in range(repeats)]
  return {"first_s": first, "second_s": second, "times": times, "models": SEEDS,
          "compiles_second": compiles_second,
          "final": {"val_accuracy_mean": float(result["acc"].mean())}}


def work_fit_seq(workload: str, row: Row, repeats: int) -> dict:
  import jax
  import jaxtrain
  from jaxtrain import losses

  configs, data, many = _seed_data()
  model, tx = _jaxtrain_model("seeds", row), _jaxtrain_tx("seeds")
  accs = []

  def setup():
    return [jaxtrain.create_train_state(model, tx, jax.random.key(seed),
                                        jax.numpy.zeros((1, 2)), loss_fn=losses.cross_entropy)
            for seed in range(len(data))]

  def run(states):
    accs.clear()
    for seed, (state, (train, val)) in enumerate(zip(states, data)):
      out = jaxtrain.fit(state, train, val=val, log=lambda _: None,
                         config=jaxtrain.FitConfig(epochs=100, batch_size=32, seed=seed,
                                                   progress=False))
      accs.append(out.history["epoch"]["val_accuracy"][-1])
    return out.state

  out = _repeat(run, repeats, setup=setup)
  out.pop("between")
  out["models"] = SEEDS
  out["final"] = {"val_accuracy_mean": sum(accs) / len(accs)}
  return out


def _experiment_env(cache_dir: str | None) -> dict:
  env = dict(os.environ)
  env["JAXTRAIN_CACHE_DIR"] = cache_dir or "off"
  env.pop("JAXTRAIN_DEBUG", None)
  return env


def work_cli(workload: str, row: Row, repeats: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "experiments.two_moons", "--workdir",
           os.path.join(tmp, "run"), "--overwrite"]
    env = _experiment_env(os.path.join(tmp, "cache"))
    times, rss = [], []
    for _ in range(repeats + 1):
      started = time.perf_counter()
      proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
      times.append(time.perf_counter() - started)
      if proc.returncode:
        raise RuntimeError(f"experiments.two_moons failed: {proc.stderr[-2000:]}")
      rss.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    final = proc.stdout.strip().splitlines()[-1]
  return {"first_s": times[0], "second_s": times[1], "times": times[1:],
          "rss_mb": max(rss), "steps": 2500, "batch": 32, "note": final}


_COUNT_SCRIPT = """
import json, pathlib, sys, jax
counts = {"compile": 0, "trace": 0}
def listen(event, duration, **kw):
  if event == "/jax/core/compile/backend_compile_duration": counts["compile"] += 1
  if event == "/jax/core/compile/jaxpr_trace_duration": counts["trace"] += 1
jax.monitoring.register_event_duration_secs_listener(listen)
from experiments import two_moons
two_moons.main(two_moons.Config(epochs=int(sys.argv[1]), workdir=pathlib.Path(sys.argv[2]),
                                overwrite=True))
print(json.dumps(counts))
"""


def work_compiles(workload: str, row: Row, repeats: int) -> dict:
  counts = {}
  with tempfile.TemporaryDirectory() as tmp:
    for epochs in (10, 100):
      proc = subprocess.run(
          [sys.executable, "-c", _COUNT_SCRIPT, str(epochs), os.path.join(tmp, str(epochs))],
          cwd=ROOT, env=_experiment_env(None), capture_output=True, text=True)
      if proc.returncode:
        raise RuntimeError(f"compile count failed: {proc.stderr[-2000:]}")
      counts[str(epochs)] = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"compiles": counts}


WORKERS = {"fit": work_fit, "baseline": work_baseline, "torch": work_torch,
           "many": work_many, "fit_seq": work_fit_seq, "cli": work_cli,
           "compiles": work_compiles}


def worker(spec: str, repeats: int) -> None:
  workload, key = spec.split(":")
  row = next(r for r in WORKLOADS[workload].rows if r.key == key)
  result = WORKERS[row.kind](workload, row, repeats)
  result.setdefault("rss_mb", _rss_mb())
  result["load_end"] = os.getloadavg()
  if "steps" not in result and workload in SETTINGS:
    s = SETTINGS[workload]
    result["steps"] = s["epochs"] * (_num_train(workload, row) // s["batch"])
    result["batch"] = s["batch"]
  print("@@RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------
# Runner side.
# ----------------------------------------------------------------------------


def _torch_command() -> list[str] | None | str:
  """How to run the PyTorch rows: "in-process", an interpreter, or None."""
  if importlib.util.find_spec("torch") is not None:
    return "in-process"
  python = os.environ.get("JAXTRAIN_TORCH_PYTHON")
  if python and shutil.which(python):
    return [python]
  return None


def _run_row(workload: Workload, row: Row, repeats: int, torch_how, tmp: str) -> dict:
  env = dict(os.environ)
  env["JAXTRAIN_CACHE_DIR"] = "off"  # compile times are compile times
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see BENCHMARKS.md: PyTorch threads
  env.setdefault("PYTHONUNBUFFERED", "1")
  if row.kind == "torch" and torch_how != "in-process":
    data = _run_data_file(workload.name, tmp)
    cmd = torch_how + [str(ROOT / "benchmarks/torch_baselines.py"), "--workload",
                       workload.name, "--data", data, "--repeats", str(repeats),
                       "--threads", str(row.opt("threads", 2))]
    marker = ""
  else:
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker",
           f"{workload.name}:{row.key}", "--repeats", str(repeats)]
    marker = "@@RESULT "
  started = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
  wall = time.perf_counter() - started
  lines = [l for l in proc.stdout.splitlines() if l.startswith(marker) and l.strip()]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
  result = json.loads(lines[-1][len(marker):])
  result["worker_wall_s"] = wall
  return result


def _run_data_file(workload: str, tmp: str) -> str:
  path = os.path.join(tmp, f"{workload}.npz")
  if not os.path.exists(path):
    _torch_data_file(workload, tmp)
  return path


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def _fmt(x, digits=3):
  if x is None or (isinstance(x, float) and x != x):
    return "-"
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  if abs(x) >= 100:
    return f"{x:.0f}"
  if abs(x) >= 10:
    return f"{x:.1f}"
  return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def _table(workload: Workload, results: dict[str, dict]) -> tuple[list[str], list[str]]:
  """Markdown lines of one workload's table, and MUST verdict lines."""
  lines, notes = [], []
  name = workload.name
  if name == "cli":
    return _cli_table(workload, results)
  base = results.get("jit", {})
  base_s = _median(base.get("times", []))
  flops = 6 * 256 * (784 * 1024 + 1024 * 1024 + 1024 * 10) if name == "mlp" else None
  header = ["row", "steps/s", "examples/s", "compile s", "end-to-end s (1st run)",
            "steady s (median)", "2nd run s", "peak RSS MB", "vs jit loop"]
  if name == "seeds":
    header[1:3] = ["model-steps/s", "model-examples/s"]
  if flops:
    header += ["GFLOP/s", "matmul GFLOP/s", "% of matmul"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for row in workload.rows:
    r = results.get(row.key)
    if r is None:
      continue
    if "error" in r:
      lines.append(f"| {row.label} | " + r["error"].replace("|", "/")[:200]
                   + " |" * (len(header) - 1))
      continue
    steady = _median(r["times"])
    models = r.get("models", 1)
    steps_s = models * r["steps"] / steady
    label = row.label
    if r.get("execution") and row.key == "fit":
      label += f" [{r['execution']}]"
    cells = [label, _fmt(steps_s), _fmt(steps_s * r["batch"]),
             _fmt(r["first_s"] - steady), _fmt(r["first_s"]), _fmt(steady),
             _fmt(r["second_s"]) + (f" ({r['compiles_second']} compiles)"
                                    if r.get("compiles_second") else ""),
             _fmt(r["rss_mb"]), _fmt(base_s / steady) + "x" if base_s == base_s else "-"]
    if flops:
      gflops = flops * r["steps"] / steady / 1e9
      matmul = r.get("matmul_s") or []
      peak = 2 * MATMUL_N ** 3 / _median(matmul) / 1e9 if matmul else float("nan")
      cells += [_fmt(gflops), _fmt(peak), f"{100 * gflops / peak:.0f}%" if matmul else "-"]
      r["gflops"], r["peak_gflops"] = gflops, peak
    r["steady_s"], r["steps_s"] = steady, steps_s
    lines.append("| " + " | ".join(cells) + " |")
  notes += _verdicts(workload, results)
  return lines, notes


def _cli_table(workload, results):
  lines = ["| row | steady s (median of warm-cache runs) | end-to-end s (1st run, cold cache) "
           "| runs | peak RSS MB |", "|---|---|---|---|---|"]
  notes = []
  r = results.get("cli")
  if r and "error" not in r:
    steady = _median(r["times"])
    r["steady_s"] = steady
    lines.append(f"| {workload.rows[0].label} | {_fmt(steady)} | {_fmt(r['first_s'])} | "
                 f"{', '.join(_fmt(t) for t in r['times'])} | {_fmt(r['rss_mb'])} |")
  elif r:
    lines.append(f"| {workload.rows[0].label} | {r['error']} | | | |")
  c = results.get("compiles")
  if c and "error" not in c:
    counts = c["compiles"]
    lines.append("")
    lines.append("| epochs | XLA compilations | traces |")
    lines.append("|---|---|---|")
    for epochs, k in counts.items():
      lines.append(f"| {epochs} | {k['compile']} | {k['trace']} |")
  notes += _verdicts(workload, results)
  return lines, notes


def _verdicts(workload: Workload, results) -> list[str]:
  """One line per MUST: met / NOT met, with the numbers."""
  def steady(key):
    r = results.get(key, {})
    return r.get("steady_s") if "error" not in r else None

  def best_torch():
    keys = [k for k in ("torch", "torch1") if steady(k)]
    return min(keys, key=steady) if keys else None

  name = workload.name
  out = []

  def verdict(ok, text):
    out.append(f"- MUST {workload.must}: **{'met' if ok else 'NOT met'}** ({text})")

  fit_keys = [r.key for r in workload.rows if r.kind == "fit" and steady(r.key)]
  if not fit_keys and name not in ("seeds", "cli"):
    return [f"- MUST {workload.must}: not measured"]
  if name in ("two_moons", "pigeon"):
    if steady("jit"):
      ratio = steady("jit") / steady("fit")
      need = 8 if name == "two_moons" else 2
      verdict(ratio >= need, f"default fit {ratio:.1f}x the per-step jit loop, need {need}x")
  elif name == "pigeon_every_step":
    t = best_torch()
    if t:
      ratio = steady(t) / steady("fit")
      verdict(ratio >= 3, f"default fit {ratio:.1f}x the faster PyTorch row ({t}), need 3x")
    else:
      out.append(f"- MUST {workload.must}: PyTorch not measured")
  elif name == "mlp":
    r = results.get("fit", {})
    if "gflops" in r:
      share = r["gflops"] / r["peak_gflops"]
      verdict(share >= 0.85, f"default fit {r['gflops']:.0f} GFLOP/s = {100 * share:.0f}% "
              f"of {r['peak_gflops']:.0f}")
  elif name in ("cnn", "cnn_issue"):
    # Rows may time different numbers of steps per run: compare steps/s.
    def rate(key):
      r = results.get(key, {})
      return r["steps"] / r["steady_s"] if steady(key) and r.get("steps") else 0.0

    torch_keys = [k for k in ("torch", "torch1") if rate(k)]
    t = max(torch_keys, key=rate) if torch_keys else None
    best = max(fit_keys, key=rate)
    if t:
      ratio = rate(best) / rate(t)
      first = rate(fit_keys[0]) / rate(t)
      verdict(ratio >= 1.0, f"best jaxtrain row ({best}) {ratio:.2f}x the faster PyTorch "
              f"row ({t}) in steps/s; row {fit_keys[0]} {first:.2f}x")
    else:
      out.append(f"- MUST {workload.must}: PyTorch not measured")
  elif name == "seeds":
    if steady("many") and steady("fit_seq"):
      ratio = steady("fit_seq") / steady("many")
      verdict(ratio >= 8, f"{ratio:.1f}x, both compiled")
  elif name == "cli":
    r, c = results.get("cli", {}), results.get("compiles", {})
    if "steady_s" in r:
      verdict(r["steady_s"] < 2.5, f"median {r['steady_s']:.2f} s")
    if "compiles" in c:
      k = c["compiles"]
      grows = k["100"]["compile"] > k["10"]["compile"]
      out.append(f"- compilations 10 vs 100 epochs: "
                 f"{'grow' if grows else 'do not grow'} with epochs")
  return out


def _environment(torch_how) -> dict:
  import jax
  import flax
  import optax
  import numpy
  info = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "cpu": _cpu_name(), "cores": os.cpu_count(),
      "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": importlib.metadata.version("jaxlib"), "flax": flax.__version__,
      "optax": optax.__version__, "numpy": numpy.__version__,
      "backend": jax.default_backend(), "commit": _git_state(),
  }
  if torch_how == "in-process":
    import torch
    info["torch"] = torch.__version__
  return info


def _git_state() -> str:
  """The commit measured, and whether jaxtrain/ differs from it."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxtrain"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (not a git checkout)"
  return commit + (" with uncommitted changes in jaxtrain/" if dirty else "")


def _cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS),
                      help="workloads to run (default: all)")
  parser.add_argument("--rows", nargs="*", help="row keys to run (default: all)")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed runs per row after the first and second (median; >= 5)")
  parser.add_argument("--out", default=None, help="also write the tables to this file")
  parser.add_argument("--json", default=None, help="also write raw results as JSON")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args.worker, args.repeats)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.repeats < 5:
    print(f"note: --repeats {args.repeats}: medians of fewer than 5 runs are only a "
          "smoke test", file=sys.stderr)
  torch_how = _torch_command()
  env_info = _environment(torch_how)
  names = args.only or list(WORKLOADS)
  started = time.perf_counter()
  out_lines = _preamble(env_info, torch_how, args.repeats)
  raw = {"environment": env_info, "workloads": {}}
  print("\n".join(out_lines), flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      workload = WORKLOADS[name]
      results, loads = {}, []
      for row in workload.rows:
        if args.rows and row.key not in args.rows:
          continue
        if row.kind == "torch" and torch_how is None:
          results[row.key] = {"error": "PyTorch not available (pip install torch, or set "
                                       "JAXTRAIN_TORCH_PYTHON)"}
          continue
        load_before = _load()
        result = _run_row(workload, row, args.repeats, torch_how, tmp)
        result["load_start"] = load_before
        loads += [load_before] + ([result["load_end"][0]] if "load_end" in result else [])
        results[row.key] = result
        print(f"  [{name}:{row.key}] "
              + (f"error: {result['error']}" if "error" in result else
                 f"median {_median(result.get('times', [])):.4g} s, worker "
                 f"{result['worker_wall_s']:.0f} s, load {load_before:.1f}"),
              file=sys.stderr, flush=True)
      table, notes = _table(workload, results)
      block = [f"### {workload.title}", "", workload.description, ""]
      if workload.reference:
        block += [f"Issue's numbers (CEO's machine): {workload.reference}.", ""]
      block += table + [""] + notes
      block += ["", f"Load average (1 min) during the rows: "
                f"{min(loads):.1f} - {max(loads):.1f}." if loads else "", ""]
      print("\n".join(block), flush=True)
      out_lines += block
      raw["workloads"][name] = results
  total = time.perf_counter() - started
  out_lines.append(f"Total benchmark time: {total:.0f} s.")
  print(out_lines[-1])
  if args.out:
    _write_markdown(pathlib.Path(args.out), out_lines)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


def _preamble(env_info, torch_how, repeats) -> list[str]:
  torch_line = {"in-process": f"PyTorch {env_info.get('torch')} in this interpreter",
                None: "PyTorch not available: its rows are omitted"}.get(
      torch_how if isinstance(torch_how, str) or torch_how is None else "",
      f"PyTorch via {torch_how[0] if torch_how else ''}")
  return [
      "## Results",
      "",
      f"- Date: {env_info['date']}",
      f"- Machine: {env_info['cpu']}, {env_info['cores']} cores, "
      f"{env_info['memory_gb']} GiB, backend {env_info['backend']}; load average "
      f"(1/5/15 min) at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
      f"- Versions: Python {env_info['python']}, jax {env_info['jax']}, jaxlib "
      f"{env_info['jaxlib']}, flax {env_info['flax']}, optax {env_info['optax']}, numpy "
      f"{env_info['numpy']}; {torch_line}",
      f"- jaxtrain: commit {env_info['commit']}",
      f"- Each row: a fresh worker process; first run, second run, then {repeats} timed "
      f"runs whose median is the steady-state time.",
      "",
  ]


BEGIN, END = "<!-- benchmarks.run: begin -->", "<!-- benchmarks.run: end -->"


def _write_markdown(path: pathlib.Path, lines: list[str]) -> None:
  """Replaces the generated section of ``path`` (or writes the file)."""
  body = "\n".join([BEGIN, *lines, END]) + "\n"
  if path.exists():
    text = path.read_text()
    if BEGIN in text and END in text:
      head, rest = text.split(BEGIN, 1)
      tail = rest.split(END, 1)[1]
      path.write_text(head + body.rstrip("\n") + tail)
      return
    path.write_text(text.rstrip("\n") + "\n\n" + body)
    return
  path.write_text("# Benchmarks\n\n" + body)


if __name__ == "__main__":
  main()
