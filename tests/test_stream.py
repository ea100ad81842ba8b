"""Streaming from random-access sources (``FitConfig(data="stream")``): the same
run as with the data resident on the device, bit for bit, from arrays, memmapped
``.npy`` files and tfds array_record files; exact resume mid-epoch; bad input."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxtrain
from jaxtrain import data
from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer
from tests.helpers import tree_equal, untimed_rows

REPO = pathlib.Path(__file__).resolve().parents[1]
MOONS = data.load("two_moons", key=jax.random.key(0), n_samples=500)  # 300 train rows


class StreamMoons(tfds.core.GeneratorBasedBuilder):
  """Two moons written as a real array_record dataset (Tensor features need no
  TensorFlow to encode)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(MOONS.train),
            "validation": self._generate_examples(MOONS.val)}

  def _generate_examples(self, arrays):
    for i, (x, y) in enumerate(zip(arrays["inputs"], arrays["targets"])):
      yield i, {"image": x, "label": int(y)}


def prepared_moons(folder) -> pathlib.Path:
  StreamMoons(data_dir=str(folder), file_format="array_record").download_and_prepare()
  return pathlib.Path(folder)


def mlp_state():
  return jaxtrain.create_train_state(
      jaxtrain.models.MLP(hidden_sizes=(16,), outputs=2), jaxtrain.make_optimizer("adam", 0.01),
      jax.random.key(1), MOONS.train["inputs"][:1], loss_fn=jaxtrain.losses.cross_entropy)


def train_into(workdir, train, val, test=None, **config):
  config = jaxtrain.FitConfig(**{"epochs": 4, "batch_size": 32, "progress": False, **config})
  result = jaxtrain.run.run(mlp_state(), train, config=config, workdir=workdir, val=val, test=test,
                        record={"experiment": "test_stream"}, checkpoint=None)
  return result, untimed_rows(workdir)


@pytest.mark.parametrize("where, devices", [
    ("arrays", 1), ("memmap", 1), ("npy", 1), ("tfds", 1), ("arrays", 4),
    ("tfds, evaluation streamed", 1), ("tfds, evaluation streamed", 4)])
def test_streamed_mlp_equals_the_resident_run_bitwise(where, devices, tmp_path, monkeypatch):
  if where == "arrays":
    train, val = data.ArraySource(MOONS.train), data.ArraySource(MOONS.val)
  elif where == "memmap":
    for name, split in (("train", MOONS.train), ("val", MOONS.val)):
      for k, v in split.items():
        np.save(tmp_path / f"{name}_{k}.npy", v)
    train, val = (data.ArraySource({k: np.load(tmp_path / f"{name}_{k}.npy", mmap_mode="r")
                                    for k in ("inputs", "targets")}) for name in ("train", "val"))
  elif where == "npy":
    train = data.write_npy(tmp_path / "train", MOONS.train)
    val = data.write_npy(tmp_path / "val", MOONS.val)
    assert isinstance(train.arrays["inputs"], data.NpyFile)
  else:
    folder = prepared_moons(tmp_path / "tfds")
    train = data.tfds_source("stream_moons", "train", data_dir=folder)
    val = data.tfds_source("stream_moons", "validation", data_dir=folder)
    assert any(str(f).endswith("stream_moons-train.array_record-00000-of-00001")
               for f in train.files)
  resident = {k: s.to_arrays() for k, s in (("train", train), ("val", val))}
  a, rows_a = train_into(tmp_path / "device", resident["train"], resident["val"],
                         test=MOONS.test, data="device", devices=devices)
  if where.endswith("streamed"):
    # Sets that do not fit are read batch by batch at every epoch end too.
    monkeypatch.setattr("jaxtrain.train.planning.fits_on_device", lambda *sets: False)
  b, rows_b = train_into(tmp_path / "stream", train, val, test=data.ArraySource(MOONS.test),
                         data="stream", devices=devices)
  assert rows_a == rows_b and len(rows_a) == 5
  assert tree_equal(a.state.params, b.state.params)
  assert a.test == b.test
  assert (tmp_path / "device/steps.jsonl").read_bytes() == (
      tmp_path / "stream/steps.jsonl").read_bytes()


def test_auto_streams_what_does_not_fit(tmp_path, monkeypatch):
  monkeypatch.setattr("jaxtrain.train.planning.fits_on_device", lambda *sets: False)
  state = mlp_state()
  feed = jaxtrain.train.planning.plan_feed(
      state, data.ArraySource(MOONS.train), jaxtrain.FitConfig(epochs=1, batch_size=32))
  # The training set is streamed, and so is its epoch-end evaluation.
  assert type(feed).__name__ == "StreamFeed" and set(feed.streamed) == {"train"}
  monkeypatch.undo()
  feed = jaxtrain.train.planning.plan_feed(
      state, data.ArraySource(MOONS.train), jaxtrain.FitConfig(epochs=1, batch_size=32))
  assert type(feed).__name__ == "DeviceFeed"  # a small source is read whole


def test_streamed_cnn_experiment_equals_the_resident_one(mnist_path, tmp_path):
  from experiments import mnist_cnn

  out = {}
  for where in ("device", "stream"):
    workdir = tmp_path / where
    mnist_cnn.main(mnist_cnn.Config(
        workdir=workdir, data_dir=mnist_path, limit=600, epochs=2, features=(8, 16), dense=32,
        batch_size=64, devices=2, data=where))
    out[where] = (untimed_rows(workdir), (workdir / "steps.jsonl").read_bytes())
  assert out["device"] == out["stream"] and len(out["device"][0]) == 3


def test_resume_of_a_streamed_run_mid_epoch_is_exact(tmp_path):
  config = jaxtrain.FitConfig(epochs=3, batch_size=32, data="stream", steps_per_call=7,
                              progress=False)
  source = data.write_npy(tmp_path / "npy", MOONS.train)
  whole = jaxtrain.fit(mlp_state(), source, val=MOONS.val, config=config)
  polls = []

  def stop_once():
    polls.append(1)
    return "SIGTERM" if len(polls) == 2 else None  # poll 1: before training

  ckpt = CheckpointConfig(every_steps=0, every_epochs=0, every_seconds=0)
  first = jaxtrain.fit(mlp_state(), source, val=MOONS.val, config=config,
                       checkpointer=Checkpointer(tmp_path / "run", ckpt), should_stop=stop_once)
  assert first.stop_reason == "interrupted by SIGTERM"
  assert int(first.state.step) == 7  # mid-epoch: 10 steps per epoch
  again = jaxtrain.fit(mlp_state(), source, val=MOONS.val, config=config,
                       checkpointer=Checkpointer(tmp_path / "run", ckpt))
  assert tree_equal(whole.state.params, again.state.params)
  assert tree_equal(whole.state.opt_state, again.state.opt_state)
  assert whole.history["epoch"]["val_loss"] == again.history["epoch"]["val_loss"]
  # A source of another length is refused, naming both lengths.
  shorter = data.ArraySource(data.take(MOONS.train, 0, 290))
  with pytest.raises(ValueError, match="the training set has 290 rows.*trained on 300"):
    jaxtrain.fit(mlp_state(), shorter, config=config,
                 checkpointer=Checkpointer(tmp_path / "run", ckpt))


def test_a_truncated_array_record_file_is_named(tmp_path):
  folder = prepared_moons(tmp_path / "tfds")
  source = data.tfds_source("stream_moons", "train", data_dir=folder)
  path = next(str(f) for f in source.files if "train" in str(f))
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 4000)
  with pytest.raises(data.DataError, match=rf"reading rows failed in {path}"):
    broken = data.tfds_source("stream_moons", "train", data_dir=folder)
    jaxtrain.fit(mlp_state(), broken, config=jaxtrain.FitConfig(
        epochs=1, batch_size=32, data="stream", progress=False))


def test_sources_check_their_input(tmp_path):
  source = data.ArraySource(MOONS.train)
  with pytest.raises(data.DataError, match="index 300 is out of range for 300 rows"):
    source.read(np.array([0, 300]))
  with pytest.raises(data.DataError, match="indices must be a 1-D integer array"):
    source.read(np.array([0.5]))
  data.write_npy(tmp_path / "bad", MOONS.train)
  np.save(tmp_path / "bad/targets.npy", MOONS.train["targets"][:10])
  with pytest.raises(data.DataError, match="different numbers of rows"):
    data.npy_source(tmp_path / "bad")
  with pytest.raises(data.DataError, match="missing .*inputs.npy"):
    data.npy_source(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="eval_every_steps needs the data on the device"):
    jaxtrain.fit(mlp_state(), source, config=jaxtrain.FitConfig(
        epochs=1, batch_size=32, data="stream", eval_every_steps=2))
  with pytest.raises(ValueError, match="train data must hold 'inputs' and 'targets'"):
    jaxtrain.fit(mlp_state(), data.ArraySource({"x": MOONS.train["inputs"]}),
                 config=jaxtrain.FitConfig(epochs=1, batch_size=32))


def test_two_processes_read_disjoint_rows(tmp_path):
  """Each of 2 processes reads only its devices' half of every batch, and the
  streamed run equals the resident one in the same processes, bit for bit."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  done = subprocess.run(
      [sys.executable, "-m", "jaxtrain.launch", "-n", "2", "--cpu-devices", "2", "--grace", "3",
       "--", str(REPO / "tests/stream_reads.py"), str(tmp_path)],
      cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
      timeout=240)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  reads = [np.load(tmp_path / f"reads_{rank}.npy") for rank in (0, 1)]
  epochs, rows = 3, 320
  for r in reads:
    assert r.shape == (epochs, rows // 2)  # half of every batch, each row once
    assert all(len(set(e.tolist())) == rows // 2 for e in r)
  for e in range(epochs):
    assert not set(reads[0][e].tolist()) & set(reads[1][e].tolist())
    assert sorted(reads[0][e].tolist() + reads[1][e].tolist()) == list(range(rows))
  assert (tmp_path / "same").read_text() == "True"
