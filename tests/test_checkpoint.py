"""Checkpoints and resume: a resumed run is the same run, bit for bit.

Every test compares a run directory (metrics.csv without its ``seconds``
column, steps.jsonl byte for byte, the final state's arrays bitwise) with an
uninterrupted run. Interruptions are scripted: ``jaxtrain.run.stop_on_signals``
is replaced by a poll that answers "SIGTERM" (or raises, for a crash) at a
chosen call boundary; real SIGTERM and SIGKILL go to ``experiments.two_moons``
subprocesses.

To stay fast the module shares a persistent compilation cache (in-process and
with its subprocesses; an executable loaded from it is the one XLA compiled, so
the numbers do not change) and skips curves.png.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import numpy as np
import optax
import pytest

import jaxtrain
import jaxtrain.rundir.run as jrun
from experiments import _cli, two_moons
from jaxtrain import checkpoint as ckpt
from jaxtrain import datasets, losses, models
from jaxtrain.rundir import compat
from jaxtrain.rundir.checkpoint import CheckpointConfig, Checkpointer, CheckpointError
from jaxtrain.train.stopping import EarlyStopping
from tests.helpers import tree_equal

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tiny in-process runs: 160 training points in batches of 32 (5 steps per
# epoch), 40 validation points.
SPE = 5
EPOCHS = 3
EVERY_STEPS = 3  # does not divide SPE: saves fall mid-epoch


# -- module setup: compilation cache, no plots ---------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """The runs' persistent cache: $JAXTRAIN_CACHE_DIR (conftest points it at a
  directory of the session), else a fresh one."""
  from jaxtrain.engine.cache import default_cache_dir

  path = default_cache_dir()
  if path is None:
    return tmp_path_factory.mktemp("jax_cache")
  os.makedirs(path, exist_ok=True)
  return pathlib.Path(path)


@pytest.fixture(scope="module", autouse=True)
def _fast(cache_dir):
  from jax.experimental.compilation_cache import compilation_cache

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jrun, "plot_curves", lambda *args, **kwargs: None)
    patch.setenv("JAXTRAIN_CACHE_DIR", str(cache_dir))  # what the CLI turns on
    yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def short_failure(test):
  """For tests whose failure would come from deep inside orbax: one line, no traceback.

  On CPython 3.11 pytest's formatting of a deep orbax/asyncio traceback can trip
  'SystemError: AST constructor recursion depth mismatch' (cpython#106905,
  pytest#10874) and end the whole session with INTERNALERROR; the error is caught
  here, garbage (closed orbax event loops) collected, and re-raised without a
  traceback or chain."""
  @functools.wraps(test)
  def wrapper(*args, **kwargs):
    failure = None
    try:
      return test(*args, **kwargs)
    except (Exception, pytest.fail.Exception) as error:  # noqa: BLE001
      failure = f"{type(error).__name__}: {str(error)[:1000]}"
      if error.__context__ is not None:
        failure += f" (while handling {type(error.__context__).__name__}: "
        failure += f"{str(error.__context__)[:300]})"
    gc.collect()
    pytest.fail(failure, pytrace=False)
  return wrapper


def subprocess_env(cache_dir) -> dict[str, str]:
  return {**os.environ, "JAXTRAIN_CACHE_DIR": str(cache_dir),
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
          "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


# -- tiny runs through jaxtrain.run.run ----------------------------------------

_DATA = {}


def moons():
  if not _DATA:
    x, y = datasets.two_moons(jax.random.key(0), n_samples=200, noise=0.2)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    _DATA["train"] = {"inputs": x[:160], "targets": y[:160]}
    _DATA["val"] = {"inputs": x[160:], "targets": y[160:]}
  return _DATA["train"], _DATA["val"]


# name -> (MLP kwargs, learning rate, early stopping, epochs)
VARIANTS = {
    "plain": (dict(hidden_sizes=(8,)), 0.1, None, EPOCHS),
    "dropout": (dict(hidden_sizes=(8,), dropout_rate=0.3), 0.1, None, EPOCHS),
    "batch_norm": (dict(hidden_sizes=(8,), batch_norm=True), 0.1, None, EPOCHS),
    "schedule": (dict(hidden_sizes=(8,)),
                 optax.warmup_cosine_decay_schedule(0.0, 0.3, 7, EPOCHS * SPE), None, EPOCHS),
    # lr 0.8: val_loss is best at epoch 4, then worse; stops after epoch 6 of 10.
    "early_stopping": (dict(hidden_sizes=(8,)), 0.8, EarlyStopping(patience=2), 10),
}


def make_state(variant="plain", hidden=None):
  model_kwargs, lr, _, _ = VARIANTS[variant]
  if hidden is not None:
    model_kwargs = {**model_kwargs, "hidden_sizes": hidden}
  return jaxtrain.create_train_state(
      models.MLP(outputs=2, **model_kwargs), jaxtrain.make_optimizer("sgd", lr, momentum=0.9),
      jax.random.key(0), np.zeros((1, 2), np.float32), loss_fn=losses.cross_entropy)


def fit_config(variant="plain", epochs=None):
  _, _, rule, default_epochs = VARIANTS[variant]
  return jaxtrain.FitConfig(epochs=epochs or default_epochs, batch_size=32, seed=0,
                            early_stopping=rule, histogram_every=0, progress=False)


def train_into(workdir, variant="plain", *, epochs=None,
               checkpoint: CheckpointConfig | None = CheckpointConfig(every_steps=EVERY_STEPS),
               state=None):
  train, val = moons()
  config = fit_config(variant, epochs)
  record = {"experiment": "test_checkpoint", "variant": variant,
            "fit": dataclasses.asdict(config)}
  return jrun.run(state or make_state(variant), train, config=config, workdir=workdir,
                  record=record, val=val, checkpoint=checkpoint)


def poll_index(step: int, variant: str = "plain", every_steps: int = EVERY_STEPS) -> int:
  """1-based index of fit's stop poll at global ``step``: poll 1 is before
  training begins (a signal during start-up), then polls happen at every call
  boundary, i.e. at multiples of ``every_steps`` and, where the host acts on
  every epoch (early stopping), at epoch ends."""
  polls = [s for s in range(1, step + 1)
           if s % every_steps == 0 or (variant == "early_stopping" and s % SPE == 0)]
  assert polls[-1] == step, f"no call boundary at step {step}"
  return 1 + len(polls)


@contextlib.contextmanager
def scripted_stop(at_poll: int, *, crash: bool = False):
  """Replaces run()'s signal handling: poll ``at_poll`` answers SIGTERM (or raises)."""
  polls = []

  @contextlib.contextmanager
  def fake():
    def should_stop():
      polls.append(1)
      if len(polls) == at_poll:
        if crash:
          raise RuntimeError("simulated crash")
        return "SIGTERM"
      return None
    yield should_stop

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jrun, "stop_on_signals", fake)
    yield polls


_REFERENCES = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted runs, computed once per (variant, cadence): without checkpoints
  (``cadence=None``) or saving every EVERY_STEPS steps (``"steps"``)."""
  def get(variant, cadence=None):
    if (variant, cadence) not in _REFERENCES:
      workdir = tmp_path_factory.mktemp(f"ref_{variant}_{cadence}")
      checkpoint = CheckpointConfig(every_steps=EVERY_STEPS) if cadence else None
      _REFERENCES[variant, cadence] = (workdir, train_into(workdir, variant,
                                                           checkpoint=checkpoint))
    return _REFERENCES[variant, cadence]
  yield get
  _REFERENCES.clear()


@pytest.fixture(scope="module")
def finished_every_epoch(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("every_epoch")
  train_into(workdir, checkpoint=CheckpointConfig(every_epochs=1, keep=2))
  return workdir


# -- comparing runs ------------------------------------------------------------

def csv_rows(workdir) -> list[list[str]]:
  """metrics.csv without the ``seconds`` column."""
  with open(pathlib.Path(workdir) / "metrics.csv", newline="") as f:
    rows = list(csv.reader(f))
  drop = rows[0].index("seconds")
  return [row[:drop] + row[drop + 1:] for row in rows]


def first_difference(a: bytes, b: bytes) -> str:
  la, lb = a.splitlines(), b.splitlines()
  for i, (x, y) in enumerate(zip(la, lb)):
    if x != y:
      return f"line {i + 1}: {x[:200]!r} != {y[:200]!r}"
  return f"{len(la)} lines != {len(lb)} lines"


def assert_same_files(workdir, ref_dir):
  workdir, ref_dir = pathlib.Path(workdir), pathlib.Path(ref_dir)
  got, want = csv_rows(workdir), csv_rows(ref_dir)
  assert got == want, "metrics.csv differs: " + first_difference(
      "\n".join(map(",".join, got)).encode(), "\n".join(map(",".join, want)).encode())
  a, b = (workdir / "steps.jsonl").read_bytes(), (ref_dir / "steps.jsonl").read_bytes()
  assert a == b, "steps.jsonl differs: " + first_difference(a, b)


def arrays(state):
  return jaxtrain.state.state_arrays(state)


def assert_same_state(a, b):
  assert tree_equal(arrays(a), arrays(b)), "final states differ"


def checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def snapshot(workdir) -> dict[str, tuple]:
  """Every path under ``workdir`` with its content hash and mtime (but the
  run-directory lock, which every run on the directory takes)."""
  out = {}
  for path in sorted(pathlib.Path(workdir).rglob("*")):
    rel = str(path.relative_to(workdir))
    if rel == ".lock":
      continue
    if path.is_file():
      out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    else:
      out[rel] = ("dir",)
  return out


# -- 1. cadence and interrupted runs, in-process --------------------------------


def fit_in_memory(variant, steps_per_call):
  train, val = moons()
  config = dataclasses.replace(fit_config(variant), steps_per_call=steps_per_call)
  return jaxtrain.fit(make_state(variant), train, config=config, val=val,
                      log=lambda message: None)


@pytest.mark.parametrize("variant,steps_per_call", [
    ("plain", 2),
    ("plain", 1), ("batch_norm", 1), ("batch_norm", 2),
])
def test_call_boundaries_do_not_change_the_run(variant, steps_per_call):
  """What a mid-epoch save or resume relies on (program.py: 'K = 1 and K = a whole
  epoch give the same run')."""
  whole = fit_in_memory(variant, 0)
  cut = fit_in_memory(variant, steps_per_call)
  assert cut.history["step"] == whole.history["step"]
  assert_same_state(cut.state, whole.state)




@pytest.mark.parametrize("variant", [
    "plain", "early_stopping", "batch_norm", "schedule"])
def test_saving_every_few_steps_does_not_change_the_run(reference, variant):
  """every_steps=3 (saves mid-epoch) equals a run without checkpoints."""
  ref_dir, ref = reference(variant)
  got_dir, got = reference(variant, "steps")
  assert_same_files(got_dir, ref_dir)
  assert_same_state(got.state, ref.state)
  assert checkpoint_steps(got_dir)[-1] == len(csv_rows(got_dir)[1:]) * SPE


def test_saving_every_epoch_synchronously_does_not_change_the_run(tmp_path, reference):
  ref_dir, ref = reference("plain")
  result = train_into(tmp_path, checkpoint=CheckpointConfig(every_epochs=1, keep=1,
                                                            async_save=False))
  assert_same_files(tmp_path, ref_dir)
  assert_same_state(result.state, ref.state)
  assert checkpoint_steps(tmp_path)[-1] == EPOCHS * SPE


CUTS = [  # (variant, global step of the interrupt); EPOCHS * SPE = 15 steps
    ("plain", 3),    # mid-epoch 1, the first boundary: nothing saved before
    ("plain", 9),    # mid-epoch 2 (batch 4), after cadence saves at 3 and 6
    ("early_stopping", 10),  # end of epoch 2, not a cadence step
    ("dropout", 9),
    ("batch_norm", 12),
    ("schedule", 6),
    ("early_stopping", 27),  # mid-epoch 6 of 10: after the best epoch (4), before the stop (6)
]


@pytest.mark.parametrize("variant,step", CUTS, ids=[f"{v}-step{s}" for v, s in CUTS])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, reference, capsys,
                                                       variant, step):
  """Against the uninterrupted run with the same cadence (cadence itself: above)."""
  ref_dir, ref = reference(variant, "steps")
  with scripted_stop(poll_index(step, variant)):
    stopped = train_into(tmp_path, variant)
  out = capsys.readouterr().out
  assert stopped.stop_reason == "interrupted by SIGTERM"
  assert f"SIGTERM: saved a checkpoint at step {step} " in out
  assert checkpoint_steps(tmp_path)[-1] == step
  assert len(csv_rows(tmp_path)) - 1 == step // SPE

  resumed = train_into(tmp_path, variant)  # the same call again
  out = capsys.readouterr().out
  assert f"resuming from the checkpoint at step {step} " in out
  assert_same_files(tmp_path, ref_dir)
  assert_same_state(resumed.state, ref.state)  # restored best params for early stopping
  assert resumed.stop_reason == ref.stop_reason
  assert resumed.best == ref.best
  assert resumed.test == ref.test


def test_crash_resumes_from_the_last_cadence_checkpoint(tmp_path, reference, capsys):
  """An exception at the call boundary after step 9 (step 12, before its save):
  the rerun resumes from step 9 and drops whatever the files hold beyond it."""
  ref_dir, ref = reference("plain", "steps")
  with scripted_stop(poll_index(12), crash=True), pytest.raises(RuntimeError,
                                                                match="simulated crash"):
    train_into(tmp_path)
  gc.collect()  # the dead run's buffered files are flushed now, not mid-resume
  assert checkpoint_steps(tmp_path)[-1] == 9
  resumed = train_into(tmp_path)
  assert "resuming from the checkpoint at step 9 " in capsys.readouterr().out
  assert_same_files(tmp_path, ref_dir)
  assert_same_state(resumed.state, ref.state)


def test_finished_run_is_not_retrained(tmp_path, finished_every_epoch, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(finished_every_epoch, workdir)
  before = csv_rows(workdir), (workdir / "steps.jsonl").read_bytes()
  again = train_into(workdir, checkpoint=CheckpointConfig(every_epochs=1, keep=2))
  assert f"resuming from the checkpoint at step {EPOCHS * SPE} " in capsys.readouterr().out
  assert (csv_rows(workdir), (workdir / "steps.jsonl").read_bytes()) == before
  assert len(again.history["epoch"]["epoch"]) == EPOCHS


# -- 2. larger --epochs, through the two_moons command ---------------------------

# Every two_moons run of this module has the same shapes (400 points, 2-16-2), so
# they share compiled programs.
MOONS_LONG = ["--samples", "400", "--epochs", "60"]
MOONS_LONG_SPE = 10


def moons_cli(workdir, *args):
  """``python -m experiments.two_moons --workdir ... args``, in this process."""
  _cli.main(two_moons.Config, two_moons.main, args=["--workdir", str(workdir), *args])


@pytest.fixture(scope="module")
def moons_long_reference(tmp_path_factory):
  """Uninterrupted, with the default cadence (one save at the end)."""
  workdir = tmp_path_factory.mktemp("moons_long_ref")
  moons_cli(workdir, *MOONS_LONG)
  return workdir


def test_larger_epochs_continue_a_finished_run(tmp_path, moons_long_reference, capsys):
  first = [a if a != "60" else "4" for a in MOONS_LONG]
  moons_cli(tmp_path, *first)
  rows = csv_rows(tmp_path)
  assert len(rows) - 1 == 4
  moons_cli(tmp_path, *MOONS_LONG)
  out = capsys.readouterr().out
  assert f"resuming from the checkpoint at step {4 * MOONS_LONG_SPE} " in out
  assert csv_rows(tmp_path)[:5] == rows
  assert_same_files(tmp_path, moons_long_reference)
  assert json.loads((tmp_path / "config.json").read_text())["config"]["epochs"] == 60


# -- 3. damaged and half-written checkpoints ------------------------------------

def damage(checkpoint_dir: pathlib.Path, how: str) -> pathlib.Path:
  """Truncates or deletes the array data file of a checkpoint.

  The data are in ``arrays/d/`` (the OCDBT store orbax merges at the end);
  ``arrays/ocdbt.process_0/`` is what the process wrote before the merge and is
  not read back."""
  files = [p for p in (checkpoint_dir / "arrays" / "d").iterdir() if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  if how == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(victim.stat().st_size // 2)
  else:
    victim.unlink()
  return victim


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, finished_every_epoch,
                                                              how):
  workdir = tmp_path / "run"
  shutil.copytree(finished_every_epoch, workdir)
  steps = checkpoint_steps(workdir)
  assert steps[-2:] == [(EPOCHS - 1) * SPE, EPOCHS * SPE]
  damage(workdir / "checkpoints" / str(steps[-1]), how)
  like = {"state": arrays(make_state())}
  checkpointer = Checkpointer(workdir, CheckpointConfig(every_epochs=1, keep=2))
  try:
    with pytest.warns(UserWarning, match="damaged"):
      step, _, meta = checkpointer.restore(like)
    assert step == steps[-2]
    assert meta["position"]["epoch"] == EPOCHS - 1
    # An explicitly requested damaged step is an error, not a silent fallback.
    with pytest.raises(CheckpointError, match="cannot be read"):
      checkpointer.restore(like, step=steps[-1])
  finally:
    checkpointer.close()


@short_failure
def test_rerun_after_a_damaged_latest_checkpoint_equals_uninterrupted(
    tmp_path, reference, capsys):
  ref_dir, ref = reference("plain")
  checkpoint = CheckpointConfig(every_epochs=1, keep=2)
  # Interrupted at the end of epoch 3 (whole-epoch calls: one poll per epoch,
  # after the one before training).
  with scripted_stop(4):
    train_into(tmp_path, checkpoint=checkpoint)
  assert checkpoint_steps(tmp_path)[-2:] == [10, 15]
  damage(tmp_path / "checkpoints" / "15", "truncate")
  with pytest.warns(UserWarning, match="damaged"):
    resumed = train_into(tmp_path, checkpoint=checkpoint)
  assert "resuming from the checkpoint at step 10 " in capsys.readouterr().out
  assert_same_files(tmp_path, ref_dir)
  assert_same_state(resumed.state, ref.state)


def orbax_tmp_name(step: int) -> str:
  from orbax.checkpoint._src.path import step as step_lib
  name = f"{step}{step_lib.TMP_DIR_SUFFIX}1234567890"
  assert re.match(step_lib.TMP_DIR_STEP_PATTERN, name), name
  return name


def test_half_written_checkpoint_is_never_picked_up(tmp_path, reference, capsys):
  ref_dir, ref = reference("plain", "steps")
  with scripted_stop(poll_index(9)):
    train_into(tmp_path)
  # What a save killed mid-write leaves: orbax's temporary directory of a later step.
  partial = tmp_path / "checkpoints" / orbax_tmp_name(12)
  shutil_copy_partial(tmp_path / "checkpoints" / "9", partial)
  resumed = train_into(tmp_path)
  assert "resuming from the checkpoint at step 9 " in capsys.readouterr().out
  assert_same_files(tmp_path, ref_dir)
  assert_same_state(resumed.state, ref.state)
  assert not partial.exists()


def shutil_copy_partial(source: pathlib.Path, target: pathlib.Path) -> None:
  """Copies half of a checkpoint's files (no commit markers) to ``target``."""
  files = sorted(p for p in source.rglob("*") if p.is_file() and "commit_success" not in p.name)
  for path in files[: len(files) // 2]:
    dest = target / path.relative_to(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


# -- 4. different config, different shapes ------------------------------------

def test_different_config_is_refused_and_nothing_changes(tmp_path, capsys):
  two = [a if a != "60" else "2" for a in MOONS_LONG]
  moons_cli(tmp_path, *two)
  before = snapshot(tmp_path)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    moons_cli(tmp_path, *two, "--hidden", "8")
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert "different config" in err and "--overwrite" in err and "hidden" in err, err
  assert snapshot(tmp_path) == before
  # --overwrite replaces it with a fresh run of the new config.
  moons_cli(tmp_path, *two, "--seed", "1", "--overwrite")
  assert json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 1
  assert "resuming" not in capsys.readouterr().out


def test_a_run_written_before_new_fit_fields_resumes(tmp_path, capsys):
  """FitConfig fields added later (at their defaults) are not a different config;
  one set to another value is."""
  two = [a if a != "60" else "2" for a in MOONS_LONG]
  moons_cli(tmp_path, *two)
  path = tmp_path / "config.json"
  record = json.loads(path.read_text())
  for name in ("conv_impl", "reduce_lr_on_plateau", "accumulate_steps"):
    del record["fit"][name]  # as an older jaxtrain wrote it
  path.write_text(json.dumps(record))
  capsys.readouterr()
  moons_cli(tmp_path, *[a if a != "2" else "3" for a in two])
  assert "resuming" in capsys.readouterr().out
  record["fit"]["accumulate_steps"] = 2
  path.write_text(json.dumps(record))
  with pytest.raises(SystemExit):
    moons_cli(tmp_path, *two)
  assert "fit.accumulate_steps: 2 there, 1 now" in capsys.readouterr().err


def assert_names_a_shape_mismatch(message: str, hidden_saved=(8,), hidden_wanted=(5,)):
  """The message names one array path whose shapes differ, with both true shapes."""
  match = re.search(r"(\S+) has shape (\(.*?\)) in the checkpoint but (\(.*?\)) in the "
                    r"model", message)
  assert match, message
  path, saved, wanted = match.groups()
  assert "Dense_" in path, message
  saved_shapes = compat._shapes({"state": arrays(make_state(hidden=hidden_saved))})
  wanted_shapes = compat._shapes({"state": arrays(make_state(hidden=hidden_wanted))})
  assert saved == str(saved_shapes[path]) and wanted == str(wanted_shapes[path]), message
  assert saved != wanted


def test_shape_mismatch_names_the_array_and_both_shapes(tmp_path):
  train_into(tmp_path, epochs=1, checkpoint=CheckpointConfig())
  other = arrays(make_state(hidden=(5,)))
  checkpointer = Checkpointer(tmp_path)
  try:
    with pytest.raises(CheckpointError) as error:
      checkpointer.restore({"state": other})
  finally:
    checkpointer.close()
  assert_names_a_shape_mismatch(str(error.value))


def test_run_with_other_shapes_on_the_same_run_is_refused_unchanged(tmp_path):
  """A record that does not name the model (user code): the shape check catches it."""
  train_into(tmp_path, epochs=1, checkpoint=CheckpointConfig())
  before = snapshot(tmp_path)
  with pytest.raises(CheckpointError) as error:
    train_into(tmp_path, epochs=2, checkpoint=CheckpointConfig(),
               state=make_state(hidden=(5,)))
  assert_names_a_shape_mismatch(str(error.value))
  assert snapshot(tmp_path) == before


# -- 5. jaxtrain.checkpoint.load ---------------------------------------------

def test_load_with_like_returns_the_final_state(reference):
  run_dir, ref = reference("plain", "steps")
  loaded = ckpt.load(run_dir, like=make_state())
  assert_same_state(loaded, ref.state)
  # Early stopping restored the best epoch's params at the end; load() gives the
  # last state (the checkpoint also holds the best params, for the run itself).
  run_dir, ref = reference("early_stopping", "steps")
  loaded = ckpt.load(run_dir, like=make_state("early_stopping"))
  assert int(loaded.step) == 6 * SPE
  assert not tree_equal(loaded.params, ref.state.params)


def test_load_with_like_of_other_shapes_is_a_clear_error(tmp_path):
  train_into(tmp_path, epochs=1, checkpoint=CheckpointConfig())
  before = snapshot(tmp_path)
  with pytest.raises(CheckpointError) as error:
    ckpt.load(tmp_path, like=make_state(hidden=(5,)))
  assert "unexpected" not in str(error.value), str(error.value)
  assert_names_a_shape_mismatch(str(error.value))
  assert snapshot(tmp_path) == before


@short_failure
def test_load_falls_back_from_a_damaged_latest_checkpoint(tmp_path, finished_every_epoch):
  workdir = tmp_path / "run"
  shutil.copytree(finished_every_epoch, workdir)
  steps = checkpoint_steps(workdir)
  damage(workdir / "checkpoints" / str(steps[-1]), "truncate")
  with pytest.warns(UserWarning, match="damaged"):
    loaded = ckpt.load(workdir, like=make_state())
  assert int(loaded.step) == steps[-2]


MOONS_BEST = ["--samples", "400", "--epochs", "12", "--learning-rate", "0.5",
              "--checkpoint.keep", "1", "--checkpoint.every-epochs", "1"]


@pytest.fixture(scope="module")
def moons_best_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("moons_best")
  moons_cli(workdir, *MOONS_BEST)
  return workdir


def best_epoch_of(run_dir) -> tuple[int, int, int]:
  """(best epoch by val_loss, last epoch, steps per epoch) from metrics.csv."""
  rows = list(csv.DictReader(open(pathlib.Path(run_dir) / "metrics.csv")))
  val = [float(r["val_loss"]) for r in rows]
  return int(np.argmin(val)) + 1, len(rows), int(rows[0]["step"])


def test_best_checkpoint_is_kept_and_is_the_lowest_val_loss_epoch(moons_best_run):
  best, last, spe = best_epoch_of(moons_best_run)
  assert best != last, "pick a config whose best epoch is not the last"
  assert checkpoint_steps(moons_best_run) == [best * spe, last * spe]


def test_best_step_is_found_by_a_new_checkpointer(moons_best_run):
  best, _, spe = best_epoch_of(moons_best_run)
  checkpointer = Checkpointer(moons_best_run, ckpt._checkpoint_config(moons_best_run))
  try:
    assert checkpointer.best_step() == best * spe
  finally:
    checkpointer.close()


def test_best_checkpoint_survives_a_resume(moons_best_run, tmp_path):
  """Orbax keeps a checkpoint's metric on disk only with a best_fn (fixed in 601bdcc:
  before, a resumed run's BestN policy saw no metrics and deleted the best one)."""
  best, last, spe = best_epoch_of(moons_best_run)
  workdir = tmp_path / "run"
  shutil.copytree(moons_best_run, workdir)
  more = [a if a != str(last) else str(last + 2) for a in MOONS_BEST]
  moons_cli(workdir, *more)
  new_best, new_last, _ = best_epoch_of(workdir)
  assert new_best == best, "pick a config whose best epoch stays the best"
  assert checkpoint_steps(workdir) == [best * spe, new_last * spe]


def val_metrics(state, run_dir):
  config = two_moons.config_from_record(json.loads((run_dir / "config.json").read_text()))
  _, val = two_moons.load_data(config)
  return jax.jit(jaxtrain.eval_step)(state, {"inputs": val["inputs"],
                                             "targets": val["targets"]})


def test_load_best_and_latest_without_like(moons_best_run):
  rows = list(csv.DictReader(open(moons_best_run / "metrics.csv")))
  val = [float(r["val_loss"]) for r in rows]
  best_epoch = int(np.argmin(val)) + 1

  best = ckpt.load(moons_best_run, step="best")
  assert int(best.step) == int(rows[best_epoch - 1]["step"])
  assert float(val_metrics(best, moons_best_run)["loss"]) == pytest.approx(
      val[best_epoch - 1], rel=1e-6)

  latest = ckpt.load(moons_best_run)  # rebuilt from config.json, no like=
  assert int(latest.step) == int(rows[-1]["step"])
  assert float(val_metrics(latest, moons_best_run)["loss"]) == pytest.approx(val[-1],
                                                                            rel=1e-6)
  # Ready for more training: the optimizer came back with it.
  train, _ = two_moons.load_data(two_moons.config_from_record(
      json.loads((moons_best_run / "config.json").read_text())))
  batch = {k: v[:32] for k, v in train.items()}
  trained, metrics = jax.jit(jaxtrain.train_step)(latest, batch, jax.random.key(1))
  assert int(trained.step) == int(latest.step) + 1
  assert np.isfinite(float(metrics["loss"]))
  assert not tree_equal(trained.params, latest.params)


@short_failure
def test_load_best_is_the_runs_best_epoch_with_early_stopping(reference):
  run_dir, ref = reference("early_stopping", "steps")
  assert ref.best.epoch == 4
  best = ckpt.load(run_dir, step="best", like=make_state("early_stopping"))
  assert tree_equal(best.params, ref.state.params)


@short_failure
def test_mid_epoch_saves_log_no_warnings(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    train_into(tmp_path, epochs=1)
  assert not [r.getMessage() for r in caplog.records if "metric" in r.getMessage()]


@short_failure
def test_load_changes_nothing_in_the_run_directory(moons_best_run):
  partial = moons_best_run / "checkpoints" / orbax_tmp_name(10 ** 6)
  partial.mkdir()
  (partial / "in_progress").write_bytes(b"x")
  try:
    before = snapshot(moons_best_run)
    ckpt.load(moons_best_run)
    assert snapshot(moons_best_run) == before
  finally:
    if partial.exists():
      (partial / "in_progress").unlink()
      partial.rmdir()


# -- 6. no pickle ------------------------------------------------------------

def test_checkpoints_hold_no_pickle(moons_best_run, reference):
  with_best, _ = reference("early_stopping", "steps")  # holds the best epoch's params too
  files = [p for run in (moons_best_run, with_best)
           for p in (run / "checkpoints").rglob("*") if p.is_file()]
  assert files
  for path in files:
    head = path.read_bytes()[:2]
    assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), path
  source = pathlib.Path(ckpt.__file__).read_text()
  assert "import pickle" not in source and "allow_pickle" not in source
  assert "PyTreeCheckpointHandler" not in source  # its fallbacks may pickle


# -- 7. real signals, through the two_moons command ------------------------------

def start_moons(workdir, cache_dir, *args) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.two_moons", "--workdir", str(workdir), *args],
      cwd=REPO, env=subprocess_env(cache_dir), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(process, workdir, timeout=120.0) -> None:
  directory = pathlib.Path(workdir) / "checkpoints"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
      return
    if process.poll() is not None:
      pytest.fail(f"run ended before its first checkpoint:\n{process.stdout.read()}")
    time.sleep(0.005)
  process.kill()
  pytest.fail("no checkpoint appeared")


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, cache_dir, moons_long_reference,
                                                 capsys):
  workdir = tmp_path / "run"
  process = start_moons(workdir, cache_dir, *MOONS_LONG, "--checkpoint.every-epochs", "5")
  wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGKILL)
  output = process.communicate(timeout=60)[0]
  assert process.returncode == -signal.SIGKILL, output
  steps = checkpoint_steps(workdir)
  assert steps and steps[-1] < 60 * MOONS_LONG_SPE, "killed too late to test anything"
  # Plus a half-written later checkpoint, as a kill during a save leaves it.
  partial = workdir / "checkpoints" / orbax_tmp_name(steps[-1] + 5 * MOONS_LONG_SPE)
  shutil_copy_partial(workdir / "checkpoints" / str(steps[-1]), partial)

  moons_cli(workdir, *MOONS_LONG, "--checkpoint.every-epochs", "5")
  assert f"resuming from the checkpoint at step {steps[-1]} " in capsys.readouterr().out
  assert_same_files(workdir, moons_long_reference)
  assert checkpoint_steps(workdir)[-1] == 60 * MOONS_LONG_SPE
  assert not partial.exists()


def test_sigterm_saves_says_where_and_exits_0(tmp_path, cache_dir, moons_long_reference,
                                             capsys):
  workdir = tmp_path / "run"
  process = start_moons(workdir, cache_dir, *MOONS_LONG, "--checkpoint.every-epochs", "5")
  wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output
  assert "SIGTERM: saved a checkpoint at step " in output, output
  step = int(output.split("saved a checkpoint at step ")[1].split()[0])
  assert step < 60 * MOONS_LONG_SPE
  assert checkpoint_steps(workdir)[-1] == step
  assert "Traceback" not in output

  moons_cli(workdir, *MOONS_LONG, "--checkpoint.every-epochs", "5")
  assert f"resuming from the checkpoint at step {step} " in capsys.readouterr().out
  assert_same_files(workdir, moons_long_reference)


CHILD = textwrap.dedent("""
    import contextlib, os, pathlib, signal, sys, time
    sys.path.insert(0, {repo!r})
    import jaxtrain.rundir.run as jrun
    from jaxtrain.rundir.checkpoint import CheckpointConfig
    from tests import test_checkpoint as t

    workdir = pathlib.Path(sys.argv[1])
    polls = []

    @contextlib.contextmanager
    def fake():
      def should_stop():
        polls.append(1)
        if len(polls) == 4:  # step 9, mid-epoch 2, before its save
          while not (workdir / "checkpoints" / "6").is_dir():
            time.sleep(0.01)  # the mid-epoch checkpoint of step 6 is complete
          os.kill(os.getpid(), signal.SIGKILL)
        return None
      yield should_stop

    jrun.stop_on_signals = fake
    jrun.plot_curves = lambda *a, **k: None
    t.train_into(workdir)
""")


@short_failure
def test_sigkill_after_a_mid_epoch_checkpoint_then_rerun_equals_uninterrupted(
    tmp_path, cache_dir, reference):
  ref_dir, ref = reference("plain", "steps")
  script = tmp_path / "child.py"
  script.write_text(CHILD.format(repo=str(REPO)))
  workdir = tmp_path / "run"
  child = subprocess.run([sys.executable, str(script), str(workdir)], cwd=REPO,
                         env=subprocess_env(cache_dir), capture_output=True, text=True,
                         timeout=300)
  assert child.returncode == -signal.SIGKILL, child.stderr
  assert checkpoint_steps(workdir) == [3, 6]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    resumed = train_into(workdir)
  # e.g. "steps.jsonl has 5 step records, expected 6; ... not be byte-identical"
  assert not [str(w.message) for w in caught if "step records" in str(w.message)]
  assert_same_files(workdir, ref_dir)
  assert_same_state(resumed.state, ref.state)


@short_failure
def test_sigterm_without_checkpoints_still_stops(tmp_path):
  with scripted_stop(1) as polls:
    result = train_into(tmp_path, checkpoint=None)
  assert polls, "should_stop was never polled"
  assert result.stop_reason == "interrupted by SIGTERM"


def test_load_prints_no_orbax_warnings(moons_best_run, caplog):
  """A reader's read-only manager made Orbax log three WARNING:absl lines per load."""
  with caplog.at_level(logging.INFO):
    ckpt.load(moons_best_run)
  assert [r.getMessage() for r in caplog.records if "orbax" in r.pathname] == []
