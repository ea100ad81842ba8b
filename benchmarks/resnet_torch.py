"""PyTorch's side of ``benchmarks.resnet``: the same ResNet-18 (flax's
``examples/imagenet/models.py``, v1.5: a 7x7 stride-2 stem, 3x3 max-pooling, basic
blocks striding in their first 3x3 convolution, 1x1 projections with batch norm, the
blocks' last batch norm scaled from zero, momentum 0.1 = flax's 0.9, eps 1e-5), on
CIFAR-sized random data, trained as a PyTorch script does (``model.train()``,
``zero_grad / backward / step``, ``loss.item()`` each step), SGD lr 0.1 momentum 0.9.

Standalone: needs only torch and numpy. Prints one JSON line: steady steps/s of
``--repeats`` timings of ``--steps`` steps each, after ``--warmup`` steps.

    python benchmarks/resnet_torch.py --width 16 --batch 64 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
    nn.init.zeros_(self.bn2.weight)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu((x if self.proj is None else self.proj(x)) + y)


class ResNet18(nn.Module):
  def __init__(self, width, classes=10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False),
                              nn.BatchNorm2d(width, momentum=0.1, eps=1e-5), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], width
    for i, size in enumerate((2, 2, 2, 2)):
      for j in range(size):
        blocks.append(Block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = width * 2**i
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, classes)

  def forward(self, x):
    return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(args.batch, 3, 32, 32)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 10, size=(args.batch,)))
  model = ResNet18(args.width)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  loss_fn = nn.CrossEntropyLoss()
  model.train()

  def steps(n):
    for _ in range(n):
      opt.zero_grad()
      loss = loss_fn(model(x), y)
      loss.backward()
      opt.step()
      loss.item()

  steps(args.warmup)
  rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    steps(args.steps)
    rates.append(args.steps / (time.perf_counter() - start))
  print(json.dumps({"steps_per_s": sorted(rates)[len(rates) // 2], "rates": rates,
                    "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
