"""Records what the experiments write, to prove a refactoring changes no byte.

    uv run python tests/behaviour.py record /tmp/before   # before moving code
    uv run python tests/behaviour.py record /tmp/after    # after
    uv run python tests/behaviour.py compare /tmp/before /tmp/after

``record`` runs each case below as its own process (4 fake CPU devices, the
compilation cache off) and keeps ``metrics.csv`` without its ``seconds`` column,
``steps.jsonl`` and ``seeds.csv``; ``compare`` exits 1 naming every file that
differs. The MNIST cases need ``--data-dir`` (default ``../shared/data/mnist``
or ``$JAXTRAIN_MNIST_DIR``).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

# name -> (module, arguments); {data} is the MNIST folder.
CASES = {
    "two_moons": ("experiments.two_moons", []),
    "two_moons_full_batch": ("experiments.two_moons", ["--full-batch"]),
    "two_moons_seeds4": ("experiments.two_moons", ["--seeds", "4"]),
    "mnist_pigeon": ("experiments.mnist_pigeon", ["--data-dir", "{data}"]),
    "mnist_cnn_2epochs": ("experiments.mnist_cnn",
                          ["--data-dir", "{data}", "--epochs", "2", "--devices", "4"]),
}
KEPT = ("metrics.csv", "steps.jsonl", "seeds.csv")


def _without_seconds(text: str) -> str:
  rows = list(csv.reader(io.StringIO(text)))
  if not rows or "seconds" not in rows[0]:
    return text
  drop = rows[0].index("seconds")
  out = io.StringIO()
  csv.writer(out, lineterminator="\n").writerows(
      [r[:drop] + r[drop + 1:] for r in rows])
  return out.getvalue()


def record(out: pathlib.Path, data_dir: pathlib.Path, only=None) -> None:
  env = {**os.environ, "JAXTRAIN_CACHE_DIR": "off", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  for name, (module, args) in CASES.items():
    if only and name not in only:
      continue
    with tempfile.TemporaryDirectory() as tmp:
      workdir = pathlib.Path(tmp) / "run"
      argv = [sys.executable, "-m", module, "--workdir", str(workdir),
              *[a.format(data=data_dir) for a in args]]
      done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
      if done.returncode:
        sys.exit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
      for path in sorted(workdir.rglob("*")):
        if path.name in KEPT:
          target = out / name / path.relative_to(workdir)
          target.parent.mkdir(parents=True, exist_ok=True)
          text = path.read_text()
          target.write_text(_without_seconds(text) if path.name == "metrics.csv" else text)
    print(f"recorded {name}")


def compare(a: pathlib.Path, b: pathlib.Path) -> int:
  files = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()}
                 | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
  differ = [f for f in files if not (a / f).is_file() or not (b / f).is_file()
            or (a / f).read_bytes() != (b / f).read_bytes()]
  for f in differ:
    print(f"differs: {f}")
  print(f"{len(files) - len(differ)} of {len(files)} files byte-identical")
  return 1 if differ or not files else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  rec = sub.add_parser("record")
  rec.add_argument("out", type=pathlib.Path)
  rec.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path(
      os.environ.get("JAXTRAIN_MNIST_DIR", REPO.parent / "shared/data/mnist")))
  rec.add_argument("--only", nargs="*")
  cmp = sub.add_parser("compare")
  cmp.add_argument("a", type=pathlib.Path)
  cmp.add_argument("b", type=pathlib.Path)
  args = parser.parse_args()
  if args.command == "compare":
    return compare(args.a, args.b)
  if args.out.exists():
    shutil.rmtree(args.out)
  record(args.out, args.data_dir.resolve(), args.only)
  return 0


if __name__ == "__main__":
  sys.exit(main())
