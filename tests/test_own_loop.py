"""A training loop of your own: ``jaxtrain.checkpoint.save`` and ``load(like=)``.

The round trip is bitwise (params, batch statistics, Adam's moments, step); a
loop SIGKILLed after its second checkpoint and resumed in a new process ends
with the parameters of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain.core.state import state_arrays
from jaxtrain.rundir.compat import CheckpointError
from tests.helpers import tree_equal

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_state(seed=0):
  model = jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2, batch_norm=True)
  return jaxtrain.create_train_state(model, jaxtrain.make_optimizer("adam", 1e-2),
                                     jax.random.key(seed), jnp.zeros((1, 3)),
                                     loss_fn=jaxtrain.losses.cross_entropy)


def trained_state(steps=3):
  """A state whose params, batch_stats and Adam moments have all moved."""
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.normal(size=(16, 3)).astype(np.float32),
           "targets": (np.arange(16) % 2).astype(np.int32)}
  state, step = make_state(), jax.jit(jaxtrain.train_step)
  for i in range(steps):
    state, _ = step(state, batch, jax.random.key(i))
  return state


def adam_moments(opt_state):
  """The Adam state (``mu``, ``nu``) inside an optimizer's state."""
  found = [n for n in jax.tree.leaves(opt_state, is_leaf=lambda n: hasattr(n, "mu"))
           if hasattr(n, "mu")]
  assert len(found) == 1
  return found[0]


def saved_steps(directory) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(directory) / "checkpoints").iterdir()
                if p.name.isdigit())


def test_save_then_load_is_bitwise(tmp_path):
  state = trained_state()
  adam = adam_moments(state.opt_state)
  assert float(jnp.abs(adam.nu["Dense_0"]["kernel"]).sum()) > 0  # moments are non-trivial
  path = jaxtrain.checkpoint.save(tmp_path, state)
  assert path == tmp_path / "checkpoints" / "3" and path.is_dir()  # committed on return

  like = make_state(seed=1)  # other values, same shapes: nothing may come from it
  restored = jaxtrain.checkpoint.load(tmp_path, like=like)
  assert int(restored.step) == 3
  assert tree_equal(state_arrays(restored), state_arrays(state))
  assert tree_equal(restored.batch_stats, state.batch_stats) and restored.batch_stats
  assert tree_equal(adam_moments(restored.opt_state), adam)
  assert not tree_equal(adam_moments(like.opt_state), adam)
  assert restored.apply_fn is like.apply_fn and restored.tx is like.tx
  assert restored.loss_fn is like.loss_fn
  assert tree_equal(state_arrays(jaxtrain.checkpoint.load(tmp_path, step=3, like=like)),
                    state_arrays(state))


def test_saving_an_existing_step_is_refused(tmp_path):
  state = trained_state()
  jaxtrain.checkpoint.save(tmp_path, state)
  with pytest.raises(ValueError) as error:
    jaxtrain.checkpoint.save(tmp_path, state.replace(params=make_state(1).params))
  message = str(error.value)
  assert "\n" not in message and "a checkpoint of step 3 already exists" in message
  assert str(tmp_path / "checkpoints") in message
  restored = jaxtrain.checkpoint.load(tmp_path, like=state)  # the first save is intact
  assert tree_equal(restored.params, state.params)


def test_a_refusal_on_another_process_is_every_processs(tmp_path, monkeypatch):
  """Each process reads the directory itself; a process that saved while
  another refused would wait in Orbax's collectives forever. Simulated: the
  agreement answers as if another process had refused (or kept no writer)."""
  from jaxtrain.engine import distributed

  state = make_state()
  jaxtrain.checkpoint.save(tmp_path, state, step=1)
  asked = []

  def another_refuses(values, how, *, name=""):
    asked.append(name)
    return [1.0] if name == "checkpoint.save: step" else [float(values[0])]

  monkeypatch.setattr(distributed, "agree", another_refuses)
  with pytest.raises(ValueError, match="^another process refused this checkpoint.save"):
    jaxtrain.checkpoint.save(tmp_path, state, step=2)
  assert saved_steps(tmp_path) == [1]
  assert asked == ["checkpoint.save: run directory", "checkpoint.save: writer",
                   "checkpoint.save: step"]
  monkeypatch.setattr(distributed, "agree", lambda values, how, *, name="": (
      [0.0] if name == "checkpoint.save: writer" else [float(values[0])]))
  jaxtrain.checkpoint.save(tmp_path, state, step=2)  # another process reopens: so does this
  assert saved_steps(tmp_path) == [1, 2]


def test_saves_see_checkpoints_changed_by_others(tmp_path):
  # save() keeps its writer open between calls: it must notice what it did not write.
  state = make_state()
  jaxtrain.checkpoint.save(tmp_path, state, step=1)
  shutil.rmtree(tmp_path / "checkpoints")
  jaxtrain.checkpoint.save(tmp_path, state, step=1)
  shutil.copytree(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "5")
  with pytest.raises(ValueError, match="step 5 already exists"):
    jaxtrain.checkpoint.save(tmp_path, state, step=5)
  assert saved_steps(tmp_path) == [1, 5]


def test_keep_2_keeps_the_last_two(tmp_path):
  state = make_state()
  for step in (1, 2, 3, 4):
    jaxtrain.checkpoint.save(tmp_path, state, step=step, keep=2)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]
  for step in (3, 4):
    assert int(jaxtrain.checkpoint.load(tmp_path, step=step, like=state).step) == 0


def test_without_keep_every_checkpoint_is_kept(tmp_path):
  for step in (1, 2, 3):
    jaxtrain.checkpoint.save(tmp_path, make_state(), step=step)
  assert saved_steps(tmp_path) == [1, 2, 3]


def test_best_epoch_of_a_save_directory_is_one_clear_line(tmp_path):
  jaxtrain.checkpoint.save(tmp_path, make_state())
  for read in (lambda: jaxtrain.checkpoint.best_epoch(tmp_path),
               lambda: jaxtrain.checkpoint.load(tmp_path, step="best", like=make_state())):
    with pytest.raises(CheckpointError) as error:
      read()
    message = str(error.value)
    assert "\n" not in message and "jaxtrain.checkpoint.save" in message
    assert "record no epochs" in message


def test_load_without_like_of_a_save_directory_is_one_clear_line(tmp_path):
  jaxtrain.checkpoint.save(tmp_path, make_state())
  with pytest.raises(CheckpointError) as error:
    jaxtrain.checkpoint.load(tmp_path)
  message = str(error.value)
  assert "\n" not in message and "pass like=" in message and str(tmp_path) in message


def test_a_run_directory_is_refused_unchanged(tmp_path):
  x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
  arrays = {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}
  config = jaxtrain.FitConfig(epochs=1, batch_size=16, seed=0, progress=False)
  result = jaxtrain.run.run(make_state(), arrays, config=config, workdir=tmp_path,
                            record={"test": True})
  before = saved_steps(tmp_path)
  with pytest.raises(ValueError) as error:
    jaxtrain.checkpoint.save(tmp_path, result.state, step=99)
  assert "\n" not in str(error.value) and "run directory" in str(error.value)
  assert saved_steps(tmp_path) == before
  # fit with a Checkpointer of its own writes no config.json: its checkpoints say so.
  (tmp_path / "config.json").unlink()
  for name in ("metrics.csv", "steps.jsonl", ".lock"):
    (tmp_path / name).unlink(missing_ok=True)
  with pytest.raises(ValueError, match="checkpoints of a jaxtrain run"):
    jaxtrain.checkpoint.save(tmp_path, result.state, step=99)
  assert saved_steps(tmp_path) == before


# -- a hand-written loop, SIGKILLed and resumed in a new process --------------------

LOOP = '''
import itertools, pathlib, sys, time
import jax, jax.numpy as jnp, numpy as np
import jaxtrain

EPOCHS, BATCH, EVERY = 6, 16, 4
x = np.random.default_rng(0).normal(size=(56, 3)).astype(np.float32)
ARRAYS = {"inputs": x, "targets": (x[:, 0] * x[:, 1] > 0).astype(np.int32)}
SPE = -(-len(x) // BATCH)  # 4 batches, the last one padded
RUN_KEY = jax.random.key(7)
STEP = jax.jit(jaxtrain.train_step)


def fresh_state():
  model = jaxtrain.models.MLP(hidden_sizes=(16,), outputs=2, dropout_rate=0.2,
                              batch_norm=True)
  return jaxtrain.create_train_state(model, jaxtrain.make_optimizer("adam", 1e-2),
                                     jax.random.key(0), jnp.zeros((1, 3)),
                                     loss_fn=jaxtrain.losses.cross_entropy)


def train(directory, *, resume=False, pause=0.0):
  state = fresh_state()
  if resume:
    state = jaxtrain.checkpoint.load(directory, like=state)
    print("resumed at step", int(state.step), flush=True)
  start = int(state.step)
  for epoch in range(start // SPE, EPOCHS):
    shuffle = jaxtrain.key_for(RUN_KEY, "shuffle", epoch)
    done = max(start - epoch * SPE, 0)
    for batch in itertools.islice(jaxtrain.data.batches(ARRAYS, BATCH, key=shuffle), done, None):
      state, _ = STEP(state, batch, jaxtrain.key_for(RUN_KEY, "dropout", state.step))
      if int(state.step) % EVERY == 0:
        jaxtrain.checkpoint.save(directory, state, keep=2)
        (pathlib.Path(directory) / f"saved-{int(state.step)}").touch()
      time.sleep(pause)  # a slower loop: the parent kills it mid-run
  return state


if __name__ == "__main__":
  directory, mode = sys.argv[1], sys.argv[2]
  state = train(directory, resume=mode == "resume", pause=0.05 if mode == "start" else 0.0)
  flat = {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state.params))}
  np.savez(pathlib.Path(directory) / "final.npz", **flat)
'''


def load_loop(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location("own_loop_child", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(textwrap.dedent(LOOP))
  directory = tmp_path / "ckpt"
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen([sys.executable, str(script), str(directory), "start"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 60
    while len(list(directory.glob("saved-*"))) < 2:
      assert child.poll() is None, f"the loop ended before its 2nd checkpoint:\n{child.stdout.read()}"
      assert time.monotonic() < deadline, "no 2nd checkpoint within 60 s"
      time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    output = child.communicate(timeout=30)[0]
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert child.returncode == -signal.SIGKILL, output
  assert not (directory / "final.npz").exists()
  killed_at = saved_steps(directory)
  assert killed_at and killed_at[-1] < 24, killed_at  # 6 epochs of 4 steps

  resumed = subprocess.Popen([sys.executable, str(script), str(directory), "resume"], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    # Meanwhile, the uninterrupted run in this process (the same code).
    loop = load_loop(script)
    reference = jax.tree.leaves(loop.train(tmp_path / "reference").params)
    stdout, stderr = resumed.communicate(timeout=120)
  finally:
    if resumed.poll() is None:
      resumed.kill()
      resumed.wait()
  assert resumed.returncode == 0, stdout + stderr
  assert f"resumed at step {killed_at[-1]}\n" in stdout
  assert "Traceback" not in stderr, stderr
  final = np.load(directory / "final.npz")
  assert len(final.files) == len(reference)
  for i, leaf in enumerate(reference):
    assert np.array_equal(final[str(i)], np.asarray(leaf)), f"leaf {i} differs"
  assert saved_steps(directory) == [20, 24]  # keep=2 across processes


def test_fit_refuses_in_one_line_to_resume_a_save_directory(tmp_path):
  """Checkpoints of checkpoint.save record no run position (fit used to fail
  with KeyError: 'position')."""
  from jaxtrain.rundir.checkpointer import Checkpointer

  state = jaxtrain.create_train_state(
      jaxtrain.models.MLP(hidden_sizes=(4,), outputs=2), jaxtrain.make_optimizer("sgd", 0.1),
      jax.random.key(0), np.zeros((1, 2), np.float32), loss_fn=jaxtrain.losses.cross_entropy)
  jaxtrain.checkpoint.save(tmp_path, state)
  x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
  with pytest.raises(ValueError) as raised:
    jaxtrain.fit(state, {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)},
                 checkpointer=Checkpointer(tmp_path), log=lambda _: None,
                 config=jaxtrain.FitConfig(epochs=1, batch_size=8, progress=False))
  assert "records no run position" in str(raised.value) and "\n" not in str(raised.value)
