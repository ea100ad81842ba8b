"""What ``fit`` shows while it trains without a run directory
(``FitConfig.progress``): a tqdm bar on a terminal, a line per epoch (the
command line's) otherwise, nothing with ``False``; the same numbers and the
same compiled calls either way."""

import dataclasses
import fcntl
import os
import pathlib
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

import jaxtrain
from jaxtrain.train import driver
from jaxtrain.train import fit as fit_module
from jaxtrain.train.cadence import Pace
from jaxtrain.train.progress import Progress
from tests.helpers import make_state, tree_equal

REPO = pathlib.Path(__file__).resolve().parents[1]

EPOCHS, BATCH, ROWS = 4, 16, 64  # 4 steps an epoch
CALL = 6  # steps per compiled call (FixedPace): calls end inside epochs, span two
DATA = textwrap.dedent("""
    import numpy as np
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    ARRAYS = {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}
""")
_namespace = {}
exec(DATA, _namespace)  # the subprocess builds the same arrays from DATA
ARRAYS = _namespace["ARRAYS"]
LINE = re.compile(r"epoch (\d+)/%d  train_loss (\S+)  " % EPOCHS)


@dataclasses.dataclass(frozen=True)
class FixedPace(Pace):
  """Calls of CALL steps whatever they take (Pace times them)."""

  def after_call(self, seconds_per_step, **kwargs):
    return dataclasses.replace(self, fetched_at=kwargs.get("fetched_at", 0.0))

  def limit(self, step, **kwargs):
    return step + CALL


@pytest.fixture
def calls(monkeypatch):
  """The (first step, steps) of every call fit fetches (one host sync each)."""
  fetched = []

  def fetch(chunks, *args, **kwargs):
    fetched.append([(c.first, c.num) for c in chunks])
    return original(chunks, *args, **kwargs)

  original = driver.fetch
  monkeypatch.setattr(fit_module, "Pace", FixedPace)
  monkeypatch.setattr(driver, "fetch", fetch)  # absorb() fetches each call
  return fetched


def run_fit(log=None, **config):
  config = jaxtrain.FitConfig(**{"epochs": EPOCHS, "batch_size": BATCH, "histogram_every": 2,
                                 **config})
  return jaxtrain.fit(make_state(), ARRAYS, val=ARRAYS, config=config, log=log)


def epoch_lines(text):
  return [line for line in text.splitlines() if line.startswith("epoch ")]


def assert_one_line_per_epoch(lines, result):
  assert len(lines) == EPOCHS
  losses = result.history["epoch"]["train_loss"]
  for epoch, line in enumerate(lines, 1):
    match = LINE.match(line)
    assert match and int(match[1]) == epoch, line
    assert match[2] == f"{losses[epoch - 1]:.4g}", line


def test_not_a_terminal_prints_a_line_per_epoch_to_stdout(calls, capsys):
  result = run_fit()  # stderr is captured: not a terminal
  out, err = capsys.readouterr()
  assert_one_line_per_epoch(out.splitlines(), result)
  assert "ex/s" in out  # the command line's line, rates included
  assert err == ""  # no bar
  # A call that ran past an epoch's end printed that epoch's line too, in order.
  assert [c[0][0] for c in calls] == [0, 6, 12]


def test_the_lines_go_to_log_and_a_silent_log_silences_them(capsys):
  said = []
  result = run_fit(log=said.append, early_stopping=jaxtrain.EarlyStopping(
      patience=EPOCHS, restore_best=True))
  assert_one_line_per_epoch(said[:-1], result)
  assert said[-1].startswith("restored the parameters of epoch ")
  run_fit(log=lambda _: None)
  assert capsys.readouterr() == ("", "")


def test_progress_false_shows_nothing_but_messages(capsys):
  said = []
  run_fit(log=said.append, progress=False, early_stopping=jaxtrain.EarlyStopping(
      patience=EPOCHS, restore_best=True))
  assert len(said) == 1 and said[0].startswith("restored the parameters of epoch ")
  run_fit(progress=False)
  assert capsys.readouterr() == ("", "")


def test_progress_changes_neither_the_numbers_nor_the_calls(calls, capsys, monkeypatch):
  advanced = []
  log_steps = Progress.log_steps

  def spy(self, steps, metrics):
    advanced.append(len(steps))
    log_steps(self, steps, metrics)

  monkeypatch.setattr(Progress, "log_steps", spy)
  shown = run_fit(progress=True)  # the bar too (on the captured stderr)
  shown_calls, calls[:] = list(calls), []
  quiet = run_fit(progress=False)
  assert shown_calls == calls == [[(0, 6)], [(6, 6)], [(12, 4)]]
  assert advanced == [6, 6, 4]  # the bar advanced once per call
  err = capsys.readouterr().err
  assert "100%|" in err and f"{EPOCHS * 4}/{EPOCHS * 4}" in err
  untimed = {k: v for k, v in shown.history["epoch"].items() if k != "seconds"}
  assert untimed == {k: v for k, v in quiet.history["epoch"].items() if k != "seconds"}
  assert shown.history["step"] == quiet.history["step"]
  assert tree_equal(shown.state.params, quiet.state.params)
  assert shown.best == quiet.best


SCRIPT = DATA + textwrap.dedent(f"""
    import jaxtrain
    from tests.helpers import make_state
    config = jaxtrain.FitConfig(epochs={EPOCHS}, batch_size={BATCH})
    jaxtrain.fit(make_state(), ARRAYS, val=ARRAYS, config=config)
""")


def test_a_terminal_shows_a_bar_that_ends_at_100_percent():
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
  os.close(slave)
  terminal = b""
  try:
    while True:
      ready, _, _ = select.select([master], [], [], 60)
      if not ready:
        pytest.fail("no output from the run for 60 s")
      try:
        data = os.read(master, 1 << 16)
      except OSError:  # EIO: the run closed its end
        break
      if not data:
        break
      terminal += data
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=60) == 0, terminal.decode(errors="replace")
  finally:
    proc.kill()
    os.close(master)
  terminal = terminal.decode(errors="replace")
  total = EPOCHS * ROWS // BATCH
  assert re.search(r"\d+%\|", terminal)  # a bar, drawn on the terminal
  bars = [s for s in re.split(r"[\r\n]+", terminal) if "%|" in s]
  assert len(bars) >= 2 and "100%|" not in bars[0], bars  # it advanced
  assert re.search(rf"^100%\|.*\| {total}/{total} \[.*step/s, loss=\S+\]", bars[-1]), bars
  # The lines go to stdout (here a pipe, as with `python script.py > out.txt`).
  lines = epoch_lines(out)
  assert [int(LINE.match(line)[1]) for line in lines] == list(range(1, EPOCHS + 1))
  assert not epoch_lines(terminal)
