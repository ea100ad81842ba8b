"""The worker side of ``benchmarks.run``: timing one row in its own process.

``benchmarks.run`` starts a fresh process per row (``--worker WORKLOAD:ROW``),
which calls :func:`worker`. A worker times the workload's first run (compile
included: "end-to-end s"), a second identical run, then ``--repeats`` more
whose median is the steady-state time; "compile s" is the first run minus that
median.

A second call of the same workload reuses the library's compiled programs
(``jaxtrain.engine.programs`` shares them between runs of the same setup); "2nd run s"
times it and notes the compilations it needed, if any.

The result goes to stdout as one ``@@RESULT <json>`` line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.timing import CompileCounter, matmul_timer, repeat, rss_mb, timed
from benchmarks.workloads import (
  BASE,
  ROOT,
  SEEDS,
  SETTINGS,
  WORKLOADS,
  Row,
  fit_config,
  jaxtrain_model,
  jaxtrain_tx,
  load_data,
  num_train,
  torch_data_file,
)

# ----------------------------------------------------------------------------
# One function per row kind.
# ----------------------------------------------------------------------------


def work_fit(workload: str, row: Row, repeats: int) -> dict:
  import jax

  import jaxtrain
  from jaxtrain import losses

  counter = CompileCounter()
  train, val = load_data(workload, row)
  model, tx = jaxtrain_model(workload, row), jaxtrain_tx(workload)
  loss_fn = losses.binary_cross_entropy_with_logits if SETTINGS[
      BASE.get(workload, workload)]["loss"] == "bce" \
      else losses.cross_entropy
  config = fit_config(workload, row)
  example = train["inputs"][:1]
  result = {}
  if row.opt("source") == "arrays":
    train = jaxtrain.data.ArraySource(train)
  elif row.opt("source") == "npy":
    folder = tempfile.mkdtemp(prefix="jaxtrain-bench-")
    train = jaxtrain.data.write_npy(folder, train)

  def setup():
    return jaxtrain.create_train_state(model, tx, jax.random.key(0), example, loss_fn=loss_fn)

  def run(state):
    out = jaxtrain.fit(state, train, val=val, config=config, log=lambda _: None)
    result["last"] = out.history["epoch"]
    return out.state

  measure = matmul_timer() if workload == "mlp" else None
  first = timed(run, setup)
  compiles_first = counter.count
  before = counter.count
  second = timed(run, setup)
  compiles_second = counter.count - before
  before = counter.count
  times, peaks = [], []
  for _ in range(repeats):
    if measure is not None:
      peaks.append(measure())
    times.append(timed(run, setup))
  compiles_steady = counter.count - before
  from jaxtrain.data.indexed import head
  from jaxtrain.train import execution
  state = jaxtrain.create_train_state(model, tx, jax.random.key(0), example, loss_fn=loss_fn)
  how = execution.explain(state, config, example, head(train, config.batch_size))
  how = (how["pick"] if config.execution == "auto" else config.execution) + (
      f": measured step {how['step_ms']:.1f} ms, scan {how['scan_ms']:.1f} ms"
      if how["by"] == "measured" else f": {how['by']}")
  last = {k: v[-1] for k, v in result["last"].items() if v and isinstance(v[-1], float)}
  return {"first_s": first, "second_s": second, "times": times, "matmul_s": peaks,
          "compiles_first": compiles_first, "compiles_second": compiles_second,
          "compiles_steady": compiles_steady,
          "execution": how,
          "final": {k: last[k] for k in ("train_loss", "val_accuracy") if k in last}}


def work_baseline(workload: str, row: Row, repeats: int) -> dict:
  import optax

  from benchmarks import baselines

  train, val = load_data(workload)
  s = SETTINGS[workload]
  if workload == "two_moons":
    model = baselines.MLP((16, 2))
  elif workload.startswith("pigeon"):
    model = baselines.MLP((30, 1))
  elif workload == "mlp":
    model = baselines.MLP((1024, 1024, 10))
  elif workload == "cnn":
    model = baselines.CNN()
  elif workload == "flax_cnn":
    model = baselines.FlaxExampleCNN()
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

  measure = matmul_timer() if workload == "mlp" else None
  out = repeat(run, repeats, measure, setup)
  out["matmul_s"] = out.pop("between")
  out["final"] = {k: v for k, v in result["last"].items()
                  if k in ("running_loss", "val_accuracy")}
  return out


def work_torch(workload: str, row: Row, repeats: int) -> dict:
  """In-process (this interpreter has torch); the runner never calls this otherwise."""
  import numpy as np

  from benchmarks import torch_baselines

  with tempfile.TemporaryDirectory() as tmp:
    with np.load(torch_data_file(workload, tmp)) as data:
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
  model, tx = jaxtrain_model("seeds", row), jaxtrain_tx("seeds")
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

  first = timed(run, setup)
  before = counter.count
  second = timed(run, setup)
  compiles_second = counter.count - before
  times = [timed(run, setup) for _ in range(repeats)]
  return {"first_s": first, "second_s": second, "times": times, "models": SEEDS,
          "compiles_second": compiles_second,
          "final": {"val_accuracy_mean": float(result["acc"].mean())}}


def work_fit_seq(workload: str, row: Row, repeats: int) -> dict:
  import jax

  import jaxtrain
  from jaxtrain import losses

  configs, data, many = _seed_data()
  model, tx = jaxtrain_model("seeds", row), jaxtrain_tx("seeds")
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

  out = repeat(run, repeats, setup=setup)
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
  result.setdefault("rss_mb", rss_mb())
  result["load_end"] = os.getloadavg()
  if "steps" not in result and BASE.get(workload, workload) in SETTINGS:
    s = SETTINGS[BASE.get(workload, workload)]
    result["steps"] = s["epochs"] * (num_train(workload, row) // s["batch"])
    result["batch"] = s["batch"]
  print("@@RESULT " + json.dumps(result))
