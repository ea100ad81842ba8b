"""Callbacks: due at the cadence asked, nothing compiled for them, the same due
points in a resumed run as in an uninterrupted one, a stop request saved like
early stopping, and a raising callback saved then said in one line."""

import contextlib
import dataclasses
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxtrain
import jaxtrain.rundir.run as jrun
from jaxtrain import checkpoint as ckpt
from jaxtrain import losses, models
from jaxtrain.rundir.checkpoint import CheckpointConfig
from jaxtrain.train.callbacks import Callback, CallbackError, Reply, as_callbacks
from tests.helpers import moons_split

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
SPE = 5  # 160 rows, batch 32


TRAIN, VAL = moons_split()  # 160 and 40 rows


TEMPLATE = jaxtrain.create_train_state(
    models.MLP(hidden_sizes=(8,), outputs=2), jaxtrain.make_optimizer("sgd", 0.1),
    jax.random.key(0), np.zeros((1, 2), np.float32), loss_fn=losses.cross_entropy)


def new_state():
  """A copy of one initial state (fit donates its arrays): one model and
  optimizer, so runs share their compiled programs."""
  return jax.tree.map(lambda x: jax.numpy.array(x, copy=True), TEMPLATE)


def config(epochs=6, **kwargs):
  return jaxtrain.FitConfig(epochs=epochs, batch_size=32, histogram_every=0, progress=False,
                            **kwargs)


class Seen:
  """A callback noting each event's (epoch, step) and row; answers ``answer(event)``."""

  def __init__(self, answer=lambda event: None):
    self.events, self.answer = [], answer
    self.__name__ = "seen"

  def __call__(self, event):
    assert int(event.state.step) == event.step  # the state at that very step
    self.events.append((event.epoch, event.step, dict(event.row)))
    return self.answer(event)

  @property
  def epochs(self):
    return [e for e, _, _ in self.events]


def test_due_at_the_cadence_asked_with_the_epochs_rows():
  every2, steps = Seen(), Seen()
  result = jaxtrain.fit(new_state(), TRAIN, val=VAL, config=config(6), log=lambda m: None,
                        callbacks=[Callback(every2, every_epochs=2),
                                   Callback(steps, every_epochs=0, every_steps=7)])
  assert every2.epochs == [2, 4, 6]
  rows = result.history["epoch"]
  for epoch, step, row in every2.events:
    assert step == epoch * SPE and row["val_loss"] == rows["val_loss"][epoch - 1]
  assert [s for _, s, _ in steps.events] == [7, 14, 21, 28]
  assert all(set(row) >= {"step", "loss"} for _, _, row in steps.events)
  losses_by_step = dict(zip(result.history["step"]["step"], result.history["step"]["loss"]))
  assert all(row["loss"] == losses_by_step[s] for _, s, row in steps.events)


class _Compiles:
  def __init__(self):
    self.names = []

  def __call__(self, event, duration, **kwargs):
    if event == BACKEND_COMPILE:
      self.names.append(str(kwargs.get("fun_name")))


def test_callbacks_compile_nothing_new():
  """A fit with callbacks after one without compiles nothing: the calls end
  at the callbacks' epochs, in programs already compiled."""
  jaxtrain.fit(new_state(), TRAIN, val=VAL, config=config(4), log=lambda m: None)
  counter = _Compiles()
  jax.monitoring.register_event_duration_secs_listener(counter)
  try:
    seen = Seen()
    jaxtrain.fit(new_state(), TRAIN, val=VAL, config=config(4), log=lambda m: None,
                 callbacks=[seen, Callback(lambda e: None, every_epochs=3)])
  finally:
    jax.monitoring.unregister_event_duration_listener(counter)
  assert seen.epochs == [1, 2, 3, 4]
  fit_compiles = [n for n in counter.names if n not in ("convert_element_type", "copy")]
  assert not fit_compiles, counter.names


def _record(epochs):
  return {"experiment": "test_callbacks", "fit": dataclasses.asdict(config(epochs))}


def into(workdir, epochs=8, callbacks=(), **kwargs):
  return jrun.run(new_state(), TRAIN, val=VAL, config=config(epochs), workdir=workdir,
                  record=_record(epochs), callbacks=list(callbacks),
                  checkpoint=CheckpointConfig(every_epochs=3), **kwargs)


@contextlib.contextmanager
def stop_when(flag: list):
  """run()'s stop poll answers SIGTERM once ``flag`` is set (by a callback)."""
  @contextlib.contextmanager
  def fake():
    yield lambda: "SIGTERM" if flag else None

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jrun, "plot_curves", lambda *args, **kwargs: None)
    patch.setattr(jrun, "stop_on_signals", fake)
    yield


def test_a_resumed_run_calls_them_at_the_same_epochs(tmp_path):
  whole = Seen()
  with stop_when([]):
    into(tmp_path / "whole", callbacks=[Callback(whole, every_epochs=2)])
  flag, first = [], Seen(lambda event: flag.append(1) if event.epoch == 4 else None)
  with stop_when(flag):
    stopped = into(tmp_path / "cut", callbacks=[Callback(first, every_epochs=2)])
  assert stopped.stop_reason == "interrupted by SIGTERM"
  assert first.epochs == [2, 4]
  second = Seen()
  with stop_when([]):
    resumed = into(tmp_path / "cut", callbacks=[Callback(second, every_epochs=2)])
  assert resumed.stop_reason is None
  assert first.epochs + second.epochs == whole.epochs == [2, 4, 6, 8]
  timeless = [[{k: v for k, v in r.items() if k != "seconds"} for _, _, r in seen.events]
              for seen in (first, second, whole)]
  assert timeless[0] + timeless[1] == timeless[2]


def test_a_stop_request_saves_and_ends_like_early_stopping(tmp_path):
  seen = Seen(lambda event: Reply(stop=event.epoch == 3, scalars={"seen": event.epoch}))
  with stop_when([]):
    result = into(tmp_path, callbacks=[seen])
  assert result.stop_reason == "stopped by callback seen"
  assert seen.epochs == [1, 2, 3] and len(result.history["epoch"]["epoch"]) == 3
  assert int(ckpt.load(tmp_path, like=new_state()).step) == 3 * SPE
  with stop_when([]):
    again = into(tmp_path, callbacks=[Seen()])  # finished: nothing trains, nothing is called
  assert again.stop_reason == "stopped by callback seen"


def test_a_raising_callback_saves_then_ends_in_one_line(tmp_path):
  def broken(event):
    if event.epoch == 2:
      raise KeyError("no such sample")

  with stop_when([]), pytest.raises(CallbackError) as error:
    into(tmp_path, callbacks=[broken])
  assert str(error.value) == ("callback broken raised at step 10 (epoch 2): "
                              "KeyError: 'no such sample'")
  assert int(ckpt.load(tmp_path, like=new_state()).step) == 2 * SPE  # saved at that very point
  seen = Seen()
  with stop_when([]):
    resumed = into(tmp_path, callbacks=[seen])  # fixed: resumes after it
  assert seen.epochs == [3, 4, 5, 6, 7, 8] and resumed.stop_reason is None


def test_a_raising_callback_on_the_command_line_is_one_line(tmp_path):
  script = textwrap.dedent(f"""
      import dataclasses
      from experiments import _cli
      from tests import test_callbacks as t

      @dataclasses.dataclass
      class Config:
        epochs: int = 2

      def boom(event):
        raise ValueError("bad sample")

      def go(c):
        t.jrun.plot_curves = lambda *a, **k: None
        return t.into({str(tmp_path / "run")!r}, epochs=c.epochs, callbacks=[boom])

      _cli.main(Config, go, [])
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=jrun.pathlib.Path(__file__).resolve().parents[1], timeout=120)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 1, out.stderr[-2000:]
  assert lines == ["error: callback boom raised at step 5 (epoch 1): ValueError: bad sample"]


@pytest.mark.parametrize("bad,match", [
    (dict(every_epochs=-1), r"every_epochs=-1"),
    (dict(every_epochs=0), r"never due"),
    (dict(every_steps=2.5), r"every_steps=2\.5"),
])
def test_bad_callbacks_are_one_line_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    Callback(print, **bad)


def test_callbacks_must_be_a_list():
  with pytest.raises(ValueError, match="expected a list of callbacks"):
    as_callbacks(print)
  with pytest.raises(ValueError, match="must be callable, got 3"):
    as_callbacks([3])
