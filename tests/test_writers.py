"""The writer interface: your own Writer gets every output of a run directory in
step order (steps, epochs, callback scalars and images, histograms, curves),
TensorBoard gets the same images, and a resumed run's redone steps reach a
Tracker once."""

import pathlib
import struct

import jax
import numpy as np
import pytest
from helpers import moons_split

import jaxtrain
import jaxtrain.rundir.run as jrun
from jaxtrain import losses, models
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.rundir.writers import Tracker, Writer, image_array
from jaxtrain.train.callbacks import Callback, CallbackError, Reply

SPE = 5  # 160 rows, batch 32


TRAIN, VAL = moons_split()  # 160 and 40 rows


def _state():
  return jaxtrain.create_train_state(
      models.MLP(hidden_sizes=(8,), outputs=2), jaxtrain.make_optimizer("sgd", 0.1),
      jax.random.key(0), np.zeros((1, 2), np.float32), loss_fn=losses.cross_entropy)


class Recorder(Writer):
  def __init__(self):
    self.calls = []

  def write_config(self, config):
    self.calls.append(("config", config["experiment"]))

  def write_steps(self, steps, columns):
    self.calls.append(("steps", [int(s) for s in steps], {k: list(v) for k, v in columns.items()}))

  def write_scalars(self, step, scalars):
    self.calls.append(("scalars", int(step), dict(scalars)))

  def write_histograms(self, step, values):
    self.calls.append(("histograms", int(step), sorted(values)))

  def write_image(self, step, name, image):
    self.calls.append(("image", int(step), name, image.shape, image.dtype))

  def flush(self):
    self.calls.append(("flush",))

  def close(self):
    self.calls.append(("close",))

  def steps(self):
    out = []
    for call in self.calls:
      if call[0] == "steps":
        out.extend(call[1])
      elif call[0] in ("scalars", "histograms", "image"):
        out.append(call[1])
    return out


def _run(workdir, writer, epochs=4, **kwargs):
  def sample(event):
    return Reply(scalars={"double_epoch": 2.0 * event.epoch},
                 images={"sample": np.full((6, 5), event.epoch / 10)})

  return jrun.run(_state(), TRAIN, val=VAL, workdir=workdir, record={"experiment": "w"},
                  config=jaxtrain.FitConfig(epochs=epochs, batch_size=32, progress=False,
                                            histogram_every=2),
                  callbacks=[Callback(sample, every_epochs=2)], writers=[writer],
                  checkpoint=CheckpointConfig(every_epochs=2), **kwargs)


def _events(folder: pathlib.Path):
  """(step, tag, kind) of every value in a folder's TensorBoard event files."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(folder.iterdir()):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack_from("<Q", data, pos)
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12: pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        out.append((event.step, value.tag, value.WhichOneof("value")))
  return out


def test_a_writer_gets_every_output_in_step_order(tmp_path):
  writer = Recorder()
  _run(tmp_path / "run", writer)
  assert writer.calls[0] == ("config", "w")
  steps = writer.steps()
  assert steps == sorted(steps)  # W&B drops a step below its current one
  per_step = [c for c in writer.calls if c[0] == "steps"]
  assert sum(len(c[1]) for c in per_step) == 4 * SPE
  assert set(per_step[0][2]) >= {"train/step_loss", "train/step_accuracy"}
  epochs = [c for c in writer.calls if c[0] == "scalars" and "epoch/val_loss" in c[2]]
  assert [c[1] for c in epochs] == [5, 10, 15, 20]
  assert ("scalars", 10, {"callback/double_epoch": 4.0}) in writer.calls
  assert ("image", 10, "sample", (6, 5, 3), np.uint8) in writer.calls
  assert ("image", 20, "curves") == writer.calls[-3][:3]  # the run's curves, at its last step
  histograms = [c for c in writer.calls if c[0] == "histograms"]
  assert [c[1] for c in histograms] == [10, 20]
  assert "weights/Dense_0/kernel" in histograms[0][2]
  assert writer.calls[-2:] == [("flush",), ("close",)]  # closed once, by run
  assert sum(c == ("close",) for c in writer.calls) == 1


def test_tensorboard_gets_the_callback_and_curves_images(tmp_path):
  _run(tmp_path / "run", Recorder())
  images = {(step, tag) for step, tag, kind in _events(tmp_path / "run" / "tensorboard")
            if kind == "image"}
  assert images == {(10, "sample"), (20, "sample"), (20, "curves")}


def test_log_images_after_a_run_adds_to_its_tensorboard(tmp_path):
  _run(tmp_path / "run", Recorder())
  jrun.log_images(tmp_path / "run", {"later": np.zeros((3, 3, 4))})
  jrun.log_images(tmp_path / "run", {"early": np.zeros((3, 3))}, step=7)
  events = _events(tmp_path / "run" / "tensorboard")
  assert (20, "later", "image") in events and (7, "early", "image") in events
  assert sum(1 for e in events if e[1] == "epoch/val_loss") == 4  # nothing hidden


class Memory(Tracker):
  """A tracker whose store is a list that only appends (as a tracker's)."""

  name = "memory"
  store: list = []

  def __init__(self):
    super().__init__()
    for step, name, _ in self.store:
      self._last[name] = max(self._last.get(name, -1), step)

  def send(self, step, scalars):
    self.store.extend((step, name, value) for name, value in scalars.items())


def test_a_tracker_gets_each_step_once_across_a_resume_and_catches_up(tmp_path, monkeypatch):
  Memory.store = []
  stop = []
  monkeypatch.setattr(jrun, "stop_on_signals", lambda: _poll(stop))

  def stop_at_3(event):
    if event.epoch == 3:
      stop.append("SIGTERM")

  jrun.run(_state(), TRAIN, val=VAL, workdir=tmp_path / "run", record={"experiment": "w"},
           config=jaxtrain.FitConfig(epochs=6, batch_size=32, progress=False),
           writers=[Memory()], callbacks=[Callback(stop_at_3)],
           checkpoint=CheckpointConfig(every_epochs=2))
  assert max(s for s, n, _ in Memory.store if n == "train/step_loss") == 4 * SPE  # saved there
  # As a store killed before it wrote the last epoch: the resume sends it first.
  Memory.store = [e for e in Memory.store if e[0] <= 2 * SPE]
  stop.clear()
  jrun.run(_state(), TRAIN, val=VAL, workdir=tmp_path / "run", record={"experiment": "w"},
           config=jaxtrain.FitConfig(epochs=6, batch_size=32, progress=False),
           writers=[Memory()], checkpoint=CheckpointConfig(every_epochs=2))
  losses_logged = [(s, v) for s, n, v in Memory.store if n == "train/step_loss"]
  assert [s for s, _ in losses_logged] == list(range(1, 6 * SPE + 1))
  lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
  import json

  assert [v for _, v in losses_logged] == [json.loads(line)["loss"] for line in lines]
  epochs = [s for s, n, _ in Memory.store if n == "epoch/train_loss"]
  assert epochs == [5, 10, 15, 20, 25, 30]


class _poll:
  def __init__(self, flag):
    self.flag = flag

  def __enter__(self):
    return lambda: self.flag[0] if self.flag else None

  def __exit__(self, *exc):
    return False


@pytest.mark.parametrize("image, shape", [
    (np.zeros((4, 5)), (4, 5, 3)), (np.ones((4, 5, 1), np.uint8), (4, 5, 3)),
    (np.zeros((4, 5, 4)), (4, 5, 3))])
def test_image_array_shapes(image, shape):
  assert image_array(image).shape == shape and image_array(image).dtype == np.uint8


def test_a_bad_image_from_a_callback_ends_the_run_naming_it(tmp_path):
  def bad(event):
    return Reply(images={"x": np.zeros((2, 2, 2, 2))})

  with pytest.raises(CallbackError,
                     match=r"callback bad raised .*\(2, 2, 2, 2\)"):
    jrun.run(_state(), TRAIN, workdir=tmp_path / "run", record={"experiment": "w"},
             config=jaxtrain.FitConfig(epochs=2, batch_size=32, progress=False),
             callbacks=[bad])
