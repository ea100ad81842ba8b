"""Long runs (issue 25): the step history in memory stays bounded, evenly
thinned past its bound, and a checkpoint's JSON does not grow with the steps
(its logs' lines go once into the checkpoints' log segments)."""

import hashlib
import json
import pathlib

import numpy as np

import jaxtrain
from experiments import _cli, two_moons
from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.rundir.plots import read_history
from jaxtrain.train import history as history_lib
from jaxtrain.train.history import StepHistory
from tests.helpers import make_state


def test_a_step_history_keeps_every_kth_step_and_the_last():
  by_call, by_line = StepHistory(limit=10), StepHistory(limit=10)
  for first in range(0, 1000, 33):  # calls of 33 steps
    steps = np.arange(first + 1, min(first + 33, 1000) + 1)
    by_call.extend({"step": steps, "loss": steps / 1000.0})
  for step in range(1, 1001):
    by_line.add(json.dumps({"step": step, "loss": step / 1000.0}), json.loads)
  table = by_call.table()
  assert table == by_line.table()
  assert by_call.stride == 128 and by_call.count == 1000
  assert table["step"] == [1, 129, 257, 385, 513, 641, 769, 897, 1000]  # every 128th, the last
  assert table["loss"] == [s / 1000.0 for s in table["step"]]


def test_a_short_history_is_every_step_and_a_new_column_is_padded():
  history = StepHistory(limit=10)
  history.extend({"step": np.array([1, 2]), "loss": np.array([0.5, 0.25])})
  history.add({"step": 3, "loss": 0.125, "val_loss": 1.0})
  assert history.table() == {"step": [1, 2, 3], "loss": [0.5, 0.25, 0.125],
                             "val_loss": [None, None, 1.0]}


def test_fit_keeps_a_bounded_step_history_and_steps_jsonl_every_step(tmp_path, monkeypatch):
  monkeypatch.setattr(history_lib, "MAX_STEP_ROWS", 16)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  train = {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}
  config = jaxtrain.FitConfig(epochs=30, batch_size=8, progress=False, histogram_every=0)
  columns = ["epoch", "step", "train_loss", "train_accuracy", "train_loss_running",
             "learning_rate", "seconds"]
  with RunMonitor(tmp_path, columns=columns, total_steps=150, steps_per_epoch=5,
                  progress=False, quiet=True) as monitor:
    result = jaxtrain.fit(make_state(), train, config=config, monitor=monitor)
  steps = result.history["step"]["step"]
  assert len(result.history["epoch"]["epoch"]) == 30  # every epoch
  assert 8 < len(steps) <= 16 + 1 and steps[0] == 1 and steps[-1] == 150
  stride = steps[1] - steps[0]
  assert stride == 16 and steps[:-1] == list(range(1, 150, stride))
  assert all(len(v) == len(steps) for v in result.history["step"].values())
  assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 150  # every step
  assert read_history(tmp_path)["step"] == result.history["step"]  # the same sample


def moons(workdir: pathlib.Path, epochs: int) -> None:
  _cli.main(two_moons.Config, two_moons.main,
            ["--samples", "200", "--batch-size", "40", "--checkpoint.every-epochs", "1",
             "--epochs", str(epochs), "--workdir", str(workdir)])


def test_a_checkpoints_json_does_not_grow_with_the_steps(tmp_path):
  epochs, sizes = (3, 30), {}
  for n in epochs:
    moons(tmp_path / str(n), n)
    last = tmp_path / str(n) / "checkpoints" / str(4 * n)
    meta = json.loads((last / "meta" / "metadata").read_text())
    assert meta["position"]["step_records"] == 4 * n
    assert meta["step_log"]["records"] == 4 * n and meta["position"]["rows"]["records"] == n
    # Orbax's OCDBT data files hold the same arrays in one or several files
    # depending on how its writes were batched (18.2 vs 20.5 kB seen for the
    # same state): their layout is Orbax's, so they are left out of the total.
    files = [p for p in last.rglob("*") if p.is_file() and "d" not in p.relative_to(last).parts]
    sizes[n] = ((last / "meta" / "metadata").stat().st_size, sum(p.stat().st_size for p in files))
  (short_meta, short_all), (long_meta, long_all) = sizes[epochs[0]], sizes[epochs[1]]
  assert long_meta <= short_meta + 64, sizes  # a few more digits, nothing per step or epoch
  assert long_all <= 1.1 * short_all, sizes


def test_log_segments_read_back_after_a_resume_elsewhere_and_not_when_damaged(
    tmp_path, monkeypatch):
  from jaxtrain.train import logstore

  monkeypatch.setattr(logstore, "PENDING", 3)  # a segment every 3 lines between saves too

  def run(lines, saves, writer=None):
    writer = writer or logstore.LogWriter("rows")
    refs = {}
    for n in saves:
      writer.add(lines[writer.records:n])
      refs[n] = writer.save(tmp_path, lambda done: iter(lines[done:]))
    return writer, refs

  a = [f"a{i}\n" for i in range(1, 11)]
  _, first = run(a, [4, 7])  # the run saves at 4 and 7, then is killed after 10
  run(a, [10], logstore.LogWriter("rows", 7, hashlib.sha256("".join(a[:7]).encode())))
  # It resumes at 4 (7 and 10 lost), and the lines after 4 differ (as epoch rows'
  # seconds do): saves at 6 and 9.
  logstore.prune(tmp_path, {"rows": 4})
  assert all(s.last <= 4 for s in logstore.segments(tmp_path, "rows"))
  b = a[:4] + [f"b{i}\n" for i in range(5, 11)]
  resumed = logstore.LogWriter("rows", 4, logstore.read_back(tmp_path, "rows", first[4])[0])
  _, second = run(b, [6, 9], resumed)
  for ref, lines in ((first[4], a[:4]), (second[6], b[:6]), (second[9], b[:9])):
    hasher, texts = logstore.read_back(tmp_path, "rows", ref)
    assert "".join(texts()) == "".join(lines) and hasher.hexdigest() == ref["sha256"]
  segment = max(logstore.segments(tmp_path, "rows"), key=lambda s: s.last)
  segment.path.write_bytes(segment.path.read_bytes()[:-2])
  assert logstore.read_back(tmp_path, "rows", second[9]) is None  # damaged: no chain left
  assert logstore.read_back(tmp_path, "rows", second[6]) is not None
