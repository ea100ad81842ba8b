"""Tests of jaxtrain.monitor: run-directory files, TensorBoard events, output."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxtrain.rundir.monitor import RunMonitor
from jaxtrain.rundir.plots import plot_curves, read_history
from jaxtrain.rundir.record import write_config

COLUMNS = ["epoch", "step", "train_loss", "train_accuracy", "val_loss",
           "val_accuracy", "train_loss_running", "learning_rate", "seconds"]
STEPS_PER_EPOCH = 3
EPOCHS = 4


def _losses(epoch: int) -> np.ndarray:
  return (np.arange(STEPS_PER_EPOCH, dtype=np.float32) + 1) / (10 * epoch)


def _row(epoch: int) -> dict:
  loss = _losses(epoch)
  return {"epoch": epoch, "step": epoch * STEPS_PER_EPOCH,
          "train_loss": np.float32(loss.mean()), "train_accuracy": 0.5 + epoch / 10,
          # Validation only every other epoch: the others give empty cells.
          "val_loss": 1 / 3 / epoch if epoch % 2 == 0 else None,
          "val_accuracy": 0.25 * epoch if epoch % 2 == 0 else None,
          "train_loss_running": float(loss[-1]), "learning_rate": 0.1 / epoch,
          "seconds": 1.25}


def _run(workdir, epochs=range(1, EPOCHS + 1), resume_rows=(),
         resume_step_records=None, **kwargs) -> None:
  """A fake training loop: per-epoch chunks of step metrics, then the row."""
  with RunMonitor(workdir, columns=COLUMNS, total_steps=EPOCHS * STEPS_PER_EPOCH,
                  steps_per_epoch=STEPS_PER_EPOCH,
                  progress=kwargs.pop("progress", False), resume_rows=resume_rows,
                  resume_step_records=resume_step_records) as mon:
    for epoch in epochs:
      if epoch == epochs[0]:
        mon.mark_compiled()  # After the first (compiling) step returned.
      steps = (epoch - 1) * STEPS_PER_EPOCH + 1 + np.arange(STEPS_PER_EPOCH)
      mon.log_steps(steps, {"loss": _losses(epoch),
                            "grad_norm": np.full(STEPS_PER_EPOCH, 2.0 ** -epoch),
                            "learning_rate": np.full(STEPS_PER_EPOCH, 0.1 / epoch)})
      mon.log_epoch(_row(epoch))
      if epoch % 2 == 0:  # fit asks its cadence (histogram_every=2)
        params = {"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}
        mon.log_histograms(steps[-1], params, grads=params)


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _events(workdir) -> list[event_pb2.Event]:
  """Reads every event file under ``workdir/tensorboard`` (TFRecord framing:
  length u64, its crc u32, data, data crc u32)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
    data = _read(path)
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def test_metrics_csv_exact_text_and_empty_cells(tmp_path):
  _run(tmp_path)
  lines = _read(tmp_path / "metrics.csv").decode().splitlines()
  assert lines[0] == ",".join(COLUMNS)
  assert len(lines) == 1 + EPOCHS
  # np.float32 written as the Python float of the same value (full repr).
  loss1 = repr(float(np.float32(_losses(1).mean())))
  assert lines[1] == (f"1,3,{loss1},0.6,,,{float(_losses(1)[-1])!r},0.1,1.25")
  assert lines[2].split(",")[4:6] == [repr(1 / 3 / 2), "0.5"]


def test_files_are_byte_identical_for_same_inputs(tmp_path):
  _run(tmp_path / "a")
  _run(tmp_path / "b")
  for name in ("metrics.csv", "steps.jsonl"):
    assert _read(tmp_path / "a" / name) == _read(tmp_path / "b" / name)


def test_steps_jsonl_records(tmp_path):
  _run(tmp_path)
  records = [json.loads(line)
             for line in _read(tmp_path / "steps.jsonl").decode().splitlines()]
  assert [r["step"] for r in records] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
  assert list(records[0]) == ["step", "loss", "grad_norm", "learning_rate"]
  expected = np.concatenate([_losses(e) for e in range(1, EPOCHS + 1)])
  # Full precision: float32 values survive the round trip exactly.
  assert [np.float32(r["loss"]) for r in records] == list(expected)
  assert records[-1]["grad_norm"] == 2.0 ** -EPOCHS


def test_log_steps_rejects_mismatched_lengths(tmp_path):
  with RunMonitor(tmp_path, columns=["epoch"], total_steps=2, steps_per_epoch=2,
                  progress=False) as mon:
    with pytest.raises(ValueError, match="loss"):
      mon.log_steps(np.array([1, 2]), {"loss": np.zeros(3)})


def test_tensorboard_scalars_and_histograms(tmp_path):
  _run(tmp_path)
  events = _events(tmp_path)
  assert events[0].file_version == "brain.Event:2"
  scalars, histograms = {}, set()
  for event in events:
    for value in event.summary.value:
      if value.HasField("histo"):
        histograms.add((value.tag, event.step))
      else:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  assert {"train/step_loss", "train/step_grad_norm", "train/step_learning_rate",
          "epoch/train_loss", "epoch/val_loss", "epoch/learning_rate"} <= set(scalars)
  assert len(scalars["train/step_loss"]) == EPOCHS * STEPS_PER_EPOCH
  assert scalars["train/step_grad_norm"][-1] == (EPOCHS * STEPS_PER_EPOCH,
                                                 2.0 ** -EPOCHS)
  # Epoch scalars sit at the global step; missing values are not logged.
  assert [s for s, _ in scalars["epoch/val_loss"]] == [6, 12]
  assert {t for t, _ in histograms} == {
      "weights/Dense_0/kernel", "weights/Dense_0/bias", "grads/Dense_0/kernel",
      "grads/Dense_0/bias"}
  assert ("weights/Dense_0/kernel", 6) in histograms
  assert ("weights/Dense_0/kernel", 12) in histograms


def test_histograms_of_flax_params_skip_non_finite(tmp_path):
  import flax.linen as nn
  import jax

  params = nn.Dense(2).init(jax.random.key(0), np.ones((1, 3)))["params"]
  grads = {"kernel": np.full((3, 2), np.nan), "bias": np.array([1.0, np.inf])}
  with RunMonitor(tmp_path, columns=["epoch"], total_steps=1, steps_per_epoch=1,
                  progress=False) as mon:
    mon.log_histograms(0, {"Dense_0": params}, grads={"Dense_0": grads})
  histos = {v.tag: v.histo for e in _events(tmp_path) for v in e.summary.value}
  assert set(histos) == {"weights/Dense_0/kernel", "weights/Dense_0/bias",
                         "grads/Dense_0/bias"}  # An all-NaN leaf is skipped.
  assert histos["grads/Dense_0/bias"].num == 1


def test_plain_line_per_epoch_when_not_a_terminal(tmp_path, capsys):
  _run(tmp_path, progress=None)  # stderr is captured: not a terminal.
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert len(lines) == EPOCHS
  assert lines[0].startswith("epoch 1/4  train_loss 0.2  train_accuracy 0.6  ")
  assert "val_loss" not in lines[0] and "val_loss 0.1667" in lines[1]
  assert "1.2 s" in lines[0] and "eta " in lines[0]
  assert "eta" not in lines[-1]  # Nothing left.
  assert err == ""  # No bar.


def test_progress_bar_and_write(tmp_path, capsys):
  with RunMonitor(tmp_path, columns=["epoch", "train_loss"], total_steps=10,
                  steps_per_epoch=5, progress=True) as mon:
    mon.log_steps(np.arange(1, 3), {"loss": np.array([0.5, 0.25])})
    mon.mark_compiled()  # Compile time is not in the speed.
    assert mon._bar.n == mon._bar.initial == 2
    assert mon._bar.format_dict["elapsed"] < 1
    mon.log_steps(np.arange(3, 6), {"loss": np.array([0.5, 0.125, 0.0625])})
    mon.write("hello")
    mon.log_epoch({"epoch": 1, "train_loss": 0.3})
  out, err = capsys.readouterr()
  assert "hello" in out and "epoch 1/2  train_loss 0.3" in out
  assert "5/10" in err and "loss=0.0625" in err


def test_close_is_idempotent_and_final(tmp_path):
  mon = RunMonitor(tmp_path, columns=["epoch"], total_steps=1, steps_per_epoch=1,
                   progress=False)
  mon.close()
  mon.close()
  with pytest.raises(RuntimeError, match="closed"):
    mon.log_epoch({"epoch": 1})


def test_resume_gives_byte_identical_files(tmp_path):
  _run(tmp_path / "full")
  # Interrupted after epoch 3 (steps logged and flushed) but checkpointed
  # after epoch 2, with a torn half line at the end of steps.jsonl.
  _run(tmp_path / "resumed", epochs=range(1, 4))
  with open(tmp_path / "resumed" / "steps.jsonl", "a") as f:
    f.write('{"step": 10, "lo')
  done = 2
  _run(tmp_path / "resumed", epochs=range(done + 1, EPOCHS + 1),
       resume_rows=[_row(e) for e in range(1, done + 1)],
       resume_step_records=done * STEPS_PER_EPOCH)
  for name in ("metrics.csv", "steps.jsonl"):
    assert _read(tmp_path / "full" / name) == _read(tmp_path / "resumed" / name)
  # The new event file hides events from step 7 on in the older one.
  purges = [e.step for e in _events(tmp_path / "resumed")
            if e.session_log.status == event_pb2.SessionLog.START]
  assert purges == [0, done * STEPS_PER_EPOCH + 1]


def test_resume_with_missing_step_records_warns(tmp_path):
  with pytest.warns(UserWarning, match="byte-identical"):
    RunMonitor(tmp_path, columns=["epoch"], total_steps=4, steps_per_epoch=2,
               progress=False, resume_rows=[{"epoch": 1}],
               resume_step_records=2).close()


def test_plot_curves_panels(tmp_path):
  import matplotlib.image

  _run(tmp_path)
  history = read_history(tmp_path)
  assert history["epoch"]["val_loss"][0] is None
  assert history["step"]["step"][-1] == EPOCHS * STEPS_PER_EPOCH
  widths = {}
  for name, h, extra in [
      ("three", history, {"full batch": history}),
      ("two", {"epoch": {"epoch": [1, 2], "train_loss": [1.0, 0.5]},
               "step": {"step": [1, 2], "loss": [1.0, 0.5]}}, None),
      ("one", {"epoch": {"train_loss": [1.0, None], "val_loss": None}}, None)]:
    path = tmp_path / f"{name}.png"
    plot_curves(h, path, extra=extra)
    assert _read(path)[:8] == b"\x89PNG\r\n\x1a\n"
    widths[name] = matplotlib.image.imread(path).shape[1]
  # One figure width per panel.
  assert widths["three"] == 3 * widths["one"] and widths["two"] == 2 * widths["one"]


@dataclasses.dataclass(frozen=True)
class _Config:
  lr: float = 0.1
  sizes: tuple = (16, 8)
  data_dir: pathlib.Path = pathlib.Path("/data")
  nested: dict = dataclasses.field(default_factory=lambda: {"b": 1, "a": None})


def test_write_config_round_trip(tmp_path):
  write_config(tmp_path, _Config())
  text = _read(tmp_path / "config.json").decode()
  config = json.loads(text)
  versions = config.pop("versions")
  assert set(versions) == {"python", "jax", "jaxlib", "flax", "optax",
                           "orbax-checkpoint", "numpy", "jaxtrain"}
  assert versions["numpy"] == np.__version__
  assert isinstance(config.pop("backend"), str)
  devices = config.pop("devices")
  assert devices["count"] >= devices["local_count"] >= 1
  assert devices["process_count"] == 1 and devices["kind"]
  assert config == {"lr": 0.1, "sizes": [16, 8], "data_dir": "/data",
                    "nested": {"a": None, "b": 1}}
  assert text.index('"data_dir"') < text.index('"lr"')  # Sorted keys.
  assert '\n  "lr": 0.1,' in text  # Indent 2.
  with pytest.raises(ValueError, match="reserved"):
    write_config(tmp_path, {"backend": "x"})
