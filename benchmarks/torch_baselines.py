"""PyTorch recipes of the benchmark workloads, written as the lessons write them.

Standalone: needs only torch and numpy (no jaxtrain), so it runs under any
Python that has them:

    python benchmarks/torch_baselines.py --workload pigeon --data arrays.npz --repeats 5

prints one JSON line: the wall time of the first run (``first_s``), of a second
one (``second_s``) and of ``repeats`` more (``times``), plus versions and the
process's peak RSS. ``benchmarks.run`` writes the ``.npz`` (the very arrays the
JAX rows train on) and calls :func:`run` in-process when ``import torch`` works,
else runs this file under ``$JAXTRAIN_TORCH_PYTHON``.

Each run builds a fresh model and optimizer, then loops over epochs: a
``torch.randperm`` shuffle, ``model.train()``, mini-batches by indexing the
tensors (no DataLoader), ``zero_grad / backward / step`` with ``loss.item()``
collected per step, and an evaluation under ``model.eval()`` and
``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

THREADS = 2


def mlp(*widths: int) -> nn.Module:
  layers = []
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    layers.append(nn.Linear(a, b))
    if i < len(widths) - 2:
      layers.append(nn.ReLU())
  return nn.Sequential(*layers)


class CNN(nn.Module):
  """jaxtrain's ``models.CNN(features=(32, 64), dense=128)``: per block 3x3 'same'
  conv (no bias) / batch norm / ReLU / 2x2 max-pool; then dense 128 and 10."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2))
    self.head = nn.Sequential(nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(),
                              nn.Linear(128, 10))

  def forward(self, x):
    return self.head(self.features(x))


class IssueNet(nn.Module):
  """The issue's conv32-conv64-pool-dense128: PyTorch's examples/mnist ``Net``
  without its two dropout layers."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, 1)
    self.conv2 = nn.Conv2d(32, 64, 3, 1)
    self.fc1 = nn.Linear(9216, 128)
    self.fc2 = nn.Linear(128, 10)

  def forward(self, x):
    x = F.relu(self.conv1(x))
    x = F.relu(self.conv2(x))
    x = F.max_pool2d(x, 2)
    x = torch.flatten(x, 1)
    x = F.relu(self.fc1(x))
    return self.fc2(x)


class FlaxExampleNet(nn.Module):
  """The Flax MNIST example's CNN: 3x3 'same' conv 32 / ReLU / 2x2 average pool,
  conv 64 / ReLU / average pool, dense 256 / ReLU, dense 10."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.fc1 = nn.Linear(7 * 7 * 64, 256)
    self.fc2 = nn.Linear(256, 10)

  def forward(self, x):
    x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
    x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
    x = torch.flatten(x, 1)
    return self.fc2(F.relu(self.fc1(x)))


class TutorialNet(nn.Module):
  """The Flax NNX MNIST tutorial's CNN (docs_nnx/mnist_tutorial.md): 3x3 'same'
  conv 32 / dropout 0.025 / batch norm / ReLU / 2x2 average pool, conv 64 / batch
  norm / ReLU / average pool, dense 256 / dropout 0.025 / ReLU, dense 10. Batch
  norm as NNX's defaults (momentum 0.99 = PyTorch's 0.01, epsilon 1e-5)."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
    self.batch_norm1 = nn.BatchNorm2d(32, eps=1e-5, momentum=0.01)
    self.dropout1 = nn.Dropout(0.025)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.batch_norm2 = nn.BatchNorm2d(64, eps=1e-5, momentum=0.01)
    self.linear1 = nn.Linear(7 * 7 * 64, 256)
    self.dropout2 = nn.Dropout(0.025)
    self.linear2 = nn.Linear(256, 10)

  def forward(self, x):
    x = F.avg_pool2d(F.relu(self.batch_norm1(self.dropout1(self.conv1(x)))), 2)
    x = F.avg_pool2d(F.relu(self.batch_norm2(self.conv2(x))), 2)
    x = torch.flatten(x, 1)
    return self.linear2(F.relu(self.dropout2(self.linear1(x))))


def _bce(out, y):
  return F.binary_cross_entropy_with_logits(out, y)


def _bce_correct(out, y):
  return ((out > 0).float() == y).sum().item()


def _ce_correct(out, y):
  return (out.argmax(1) == y).sum().item()


def evaluate(model, x, y, loss_fn, correct_fn, batch_size=1024):
  model.eval()
  loss_sum, correct = 0.0, 0
  with torch.no_grad():
    for i in range(0, len(y), batch_size):
      out = model(x[i : i + batch_size])
      loss_sum += loss_fn(out, y[i : i + batch_size]).item() * len(out)
      correct += correct_fn(out, y[i : i + batch_size])
  return loss_sum / len(y), correct / len(y)


def train(model, optimizer, loss_fn, correct_fn, x, y, *, epochs, batch_size, evals,
          eval_every_step=False):
  """The lessons' loop; returns one history row per epoch."""
  n = len(y)
  history = []
  for _ in range(epochs):
    model.train()
    perm = torch.randperm(n)
    running, steps, step_accuracy = 0.0, 0, []
    for i in range(0, n, batch_size):
      idx = perm[i : i + batch_size]
      xb, yb = x[idx], y[idx]
      optimizer.zero_grad()
      loss = loss_fn(model(xb), yb)
      loss.backward()
      optimizer.step()
      running += loss.item()
      steps += 1
      if eval_every_step:
        step_accuracy.append({name: evaluate(model, ex, ey, loss_fn, correct_fn)[1]
                              for name, (ex, ey) in evals.items()})
        model.train()
    row = {"running_loss": running / steps}
    if eval_every_step:
      row["accuracy_steps"] = step_accuracy
    else:
      for name, (ex, ey) in evals.items():
        row[f"{name}_loss"], row[f"{name}_accuracy"] = evaluate(model, ex, ey, loss_fn,
                                                                correct_fn)
    history.append(row)
  return history


# The workloads of benchmarks.run: model, optimizer (SGD momentum 0.9 or AdamW weight
# decay 0.01), loss, epochs, batch size, evaluation each epoch or after every step.
WORKLOADS = {
    "two_moons": dict(model=lambda: mlp(2, 16, 2), opt=("sgd", 0.1), loss="ce",
                      epochs=100, batch_size=32, evaluate=True),
    "pigeon": dict(model=lambda: mlp(784, 30, 1), opt=("sgd", 0.005), loss="bce",
                   epochs=15, batch_size=32, evaluate=True),
    "pigeon_every_step": dict(model=lambda: mlp(784, 30, 1), opt=("sgd", 0.005),
                              loss="bce", epochs=15, batch_size=32, evaluate=True,
                              eval_every_step=True),
    "mlp": dict(model=lambda: mlp(784, 1024, 1024, 10), opt=("adamw", 1e-3), loss="ce",
                epochs=1, batch_size=256, evaluate=False),
    "cnn": dict(model=CNN, opt=("sgd", 0.01), loss="ce", epochs=1, batch_size=128,
                evaluate=False, image=True),
    "cnn_issue": dict(model=IssueNet, opt=("sgd", 0.01), loss="ce", epochs=1,
                      batch_size=128, evaluate=False, image=True),
    "flax_cnn": dict(model=FlaxExampleNet, opt=("sgd", 0.1), loss="ce", epochs=1,
                     batch_size=128, evaluate=False, image=True),
    # benchmarks.nnx_cnn: optax.adamw(0.005, 0.9) as the tutorial (b1 0.9, b2 0.999,
    # eps 1e-8, weight decay 1e-4).
    "nnx_cnn": dict(model=TutorialNet, opt=("adamw", 0.005), weight_decay=1e-4, loss="ce",
                    epochs=1, batch_size=32, evaluate=False, image=True),
}


def _tensors(arrays, spec):
  def inputs(x):
    x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    if spec.get("image"):  # NHWC or NHW -> NCHW
      x = x.reshape(x.shape[0], 28, 28, -1).permute(0, 3, 1, 2).contiguous()
    return x

  def targets(y):
    if spec["loss"] == "bce":
      return torch.from_numpy(np.asarray(y, np.float32)).reshape(-1, 1)
    return torch.from_numpy(np.asarray(y, np.int64))

  out = {"train": (inputs(arrays["train_inputs"]), targets(arrays["train_targets"]))}
  if "val_inputs" in arrays:
    out["val"] = (inputs(arrays["val_inputs"]), targets(arrays["val_targets"]))
  return out


def build(name: str, seed: int):
  """The fresh model and optimizer a run trains (built outside the timer)."""
  spec = WORKLOADS[name]
  torch.manual_seed(seed)
  model = spec["model"]()
  kind, lr = spec["opt"]
  if kind == "sgd":
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
  else:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr,
                                  weight_decay=spec.get("weight_decay", 0.01))
  return model, optimizer


def run_once(name: str, tensors, model, optimizer):
  spec = WORKLOADS[name]
  loss_fn, correct_fn = ((_bce, _bce_correct) if spec["loss"] == "bce"
                         else (F.cross_entropy, _ce_correct))
  evals = tensors if spec["evaluate"] else {}
  x, y = tensors["train"]
  return train(model, optimizer, loss_fn, correct_fn, x, y, epochs=spec["epochs"],
               batch_size=spec["batch_size"], evals=evals,
               eval_every_step=spec.get("eval_every_step", False))


def run(name: str, arrays, repeats: int = 5, threads: int | None = None) -> dict:
  """Times the workload: a first run, a second one, then ``repeats`` more."""
  torch.set_num_threads(threads or THREADS)
  spec = WORKLOADS[name]
  tensors = _tensors(arrays, spec)
  timings = []
  history = None
  for rep in range(repeats + 2):
    model, optimizer = build(name, rep)
    started = time.perf_counter()
    history = run_once(name, tensors, model, optimizer)
    timings.append(time.perf_counter() - started)
  last = history[-1]
  return {
      "first_s": timings[0], "second_s": timings[1], "times": timings[2:],
      "steps": spec["epochs"] * (-(-len(tensors["train"][1]) // spec["batch_size"])),
      "batch": spec["batch_size"],
      "final": {k: v for k, v in last.items() if isinstance(v, float)},
      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "versions": {"torch": torch.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
      "threads": torch.get_num_threads(),
      "load": os.getloadavg(),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
  parser.add_argument("--data", required=True, help=".npz with train_/val_ inputs/targets")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
  args = parser.parse_args(argv)
  with np.load(args.data) as data:
    arrays = {k: data[k] for k in data.files}
  print(json.dumps(run(args.workload, arrays, args.repeats, threads=args.threads)))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
