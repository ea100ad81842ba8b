"""What ``benchmarks.run`` measures: the workloads, their rows, and their builders.

A workload is one training job (data, model, optimizer, epochs, evaluations) and
the rows that run it: jaxtrain's ``fit`` in its executions, a per-step
``jax.jit`` loop, PyTorch, ... Each workload names its MUST (the target its
table is judged by) and the issue's numbers as strings. The builders here give
a worker the workload's data, jaxtrain model, optimizer and ``FitConfig``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

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


# ----------------------------------------------------------------------------
# Workloads and their rows.
# ----------------------------------------------------------------------------


# Workloads measured on another's model and data.
BASE = {"stream_mlp": "mlp", "stream_cnn": "cnn"}


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
        (_fit("fit", "jaxtrain fit (defaults: matmul convs on CPU, execution auto)"),
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
        (_fit("fit", "jaxtrain fit (IssueCNN, matmul conv, execution auto)", model="issue",
              conv="matmul"),
         _fit("fit_matmul_step", "jaxtrain fit (IssueCNN, matmul conv, step)",
              model="issue", conv="matmul", execution="step"),
         _fit("fit_matmul_scan", "jaxtrain fit (IssueCNN, matmul conv, scan)",
              model="issue", conv="matmul", execution="scan"),
         Row("jit", "per-step jax.jit loop (Flax-examples style, lax.conv)", "baseline",
             (("model", "issue"),)),
         _torch(threads=2), _torch("torch1", threads=1)),
        "jaxtrain >= 1.0x PyTorch steps/s",
        "PyTorch 18.3 steps/s / per-step jit 5.1 / scan 0.57 (5.2 unrolled)"),
    Workload(
        "flax_cnn", "CNN, batch 128: the Flax MNIST example's model, unchanged",
        f"flax examples/mnist CNN as published (nn.Conv 32 / avg-pool / nn.Conv 64 / "
        f"avg-pool / dense 256 / dense 10; 3x3 SAME convs with bias, no batch norm, no "
        f"train argument), SGD 0.1 momentum 0.9 as in the example, {CNN_STEPS} steps of "
        "28x28x1 synthetic images per run, no evaluation. jaxtrain trains the model "
        "object unchanged; by default fit computes its nn.Conv layers as shifted-slice "
        "matmuls on CPU (FitConfig.conv_impl) and loops (execution auto -> scan).",
        (_fit("fit", "jaxtrain fit (default: nn.Conv as matmuls, scan)", model="flax"),
         _fit("fit_xla_step", "jaxtrain fit, conv_impl=\"xla\", execution=\"step\"",
              model="flax", conv="xla", execution="step"),
         Row("jit", "the Flax example's per-step jax.jit loop (lax.conv)", "baseline",
             (("model", "flax"),)),
         _torch(threads=2), _torch("torch1", threads=1)),
        "jaxtrain >= 1.0x PyTorch steps/s, the model unchanged", ""),
    Workload(
        "stream_mlp", "streamed vs device-resident: the MLP above",
        f"As mlp ({MLP_STEPS} steps of batch 256, AdamW): the training rows resident on "
        "the device, or FitConfig(data=\"stream\"), read on the host step by step "
        "from a jaxtrain.data.ArraySource (memory) or a npy_source (.npy files read row by row, "
        "written to a temporary folder).",
        (_fit("fit", "jaxtrain fit, data resident (default)"),
         _fit("fit_stream", "jaxtrain fit, data=\"stream\" from memory", data="stream",
              source="arrays"),
         _fit("fit_stream_npy", "jaxtrain fit, data=\"stream\" from .npy files (npy_source)",
              data="stream", source="npy")),
        "streamed >= 0.9x device-resident steps/s", ""),
    Workload(
        "stream_cnn", "streamed vs device-resident: the CNN above",
        f"As cnn ({CNN_STEPS} steps of batch 128, models.CNN(features=(32, 64), dense=128)): "
        "resident, or streamed from memory or from .npy files (npy_source).",
        (_fit("fit", "jaxtrain fit, data resident (default)"),
         _fit("fit_stream", "jaxtrain fit, data=\"stream\" from memory", data="stream",
              source="arrays"),
         _fit("fit_stream_npy", "jaxtrain fit, data=\"stream\" from .npy files (npy_source)",
              data="stream", source="npy")),
        "streamed >= 0.9x device-resident steps/s", ""),
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
# Builders: data, models, optimizers, fit configs.
# ----------------------------------------------------------------------------


def num_train(workload: str, row: Row | None = None) -> int:
  workload = BASE.get(workload, workload)
  if workload in ("two_moons", "seeds", "cli"):
    return 800
  if workload.startswith("pigeon"):
    return 1024
  if workload == "mlp":
    return 256 * MLP_STEPS
  default = CNN_STEPS if workload in ("cnn", "flax_cnn") else CNN_ISSUE_STEPS
  return 128 * ((row.opt("steps") if row is not None else None) or default)


def load_data(workload: str, row: Row | None = None):
  """``(train, val)`` numpy arrays of a workload (val None when not evaluated)."""
  workload = BASE.get(workload, workload)
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
  n = num_train(workload, row)
  return ({"inputs": rng.random((n, 28, 28, 1), np.float32),
           "targets": rng.integers(0, 10, n).astype(np.int32)}, None)


def torch_data_file(workload: str, directory: str) -> str:
  """Writes the workload's arrays to ``directory/<workload>.npz`` for the PyTorch rows."""
  import numpy as np
  train, val = load_data(workload)
  arrays = {f"train_{k}": v for k, v in train.items()}
  if val is not None:
    arrays.update({f"val_{k}": v for k, v in val.items()})
  path = os.path.join(directory, f"{workload}.npz")
  np.savez(path, **arrays)
  return path


# Per workload: epochs, batch size, optimizer, loss.
SETTINGS = {
    "two_moons": dict(epochs=100, batch=32, opt=("sgd", 0.1), loss="ce"),
    "seeds": dict(epochs=100, batch=32, opt=("sgd", 0.1), loss="ce"),
    "pigeon": dict(epochs=15, batch=32, opt=("sgd", 0.005), loss="bce"),
    "pigeon_every_step": dict(epochs=15, batch=32, opt=("sgd", 0.005), loss="bce"),
    "mlp": dict(epochs=1, batch=256, opt=("adamw", 1e-3), loss="ce"),
    "cnn": dict(epochs=1, batch=128, opt=("sgd", 0.01), loss="ce"),
    "cnn_issue": dict(epochs=1, batch=128, opt=("sgd", 0.01), loss="ce"),
    "flax_cnn": dict(epochs=1, batch=128, opt=("sgd", 0.1), loss="ce"),
}


def jaxtrain_model(workload: str, row: Row):
  workload = BASE.get(workload, workload)
  from benchmarks import baselines
  from jaxtrain import models

  if workload in ("two_moons", "seeds"):
    return models.MLP(hidden_sizes=(16,), outputs=2)
  if workload.startswith("pigeon"):
    return models.Pigeon(30, init_style="torch")
  if workload == "mlp":
    return models.MLP(hidden_sizes=(1024, 1024), outputs=10)
  if row.opt("model") == "flax":
    return baselines.FlaxExampleCNN()
  if row.opt("model") == "issue":
    return baselines.IssueCNN(impl=row.opt("conv", "xla"))
  return models.CNN(features=(32, 64), dense=128, conv_impl=row.opt("conv", "auto"))


def jaxtrain_tx(workload: str):
  workload = BASE.get(workload, workload)
  import jaxtrain

  kind, lr = SETTINGS[workload]["opt"]
  if kind == "sgd":
    return jaxtrain.make_optimizer("sgd", lr, momentum=0.9)
  return jaxtrain.make_optimizer("adamw", lr, weight_decay=0.01)


def fit_config(workload: str, row: Row, **changes):
  workload = BASE.get(workload, workload)
  import jaxtrain
  s = SETTINGS[workload]
  return jaxtrain.FitConfig(
      epochs=s["epochs"], batch_size=s["batch"], execution=row.opt("execution", "auto"),
      eval_every_steps=row.opt("eval_every", 0), evaluate_train=workload not in (
          "mlp", "cnn", "cnn_issue", "flax_cnn"), conv_impl=row.opt("conv", "auto")
      if row.opt("model") == "flax" else "auto", data=row.opt("data", "auto"),
      progress=False, **changes)
