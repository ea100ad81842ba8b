"""Experiment trackers as writers: MLflow, Weights & Biases and Trackio, offline.

``run(..., track="mlflow,wandb")`` (``--track`` on the command line) opens one
tracked run per tracker beside the run directory's own files, and keeps their
ids in ``<workdir>/trackers.json``: a resumed or continued run logs into the same
tracked runs, each name at each step once (:class:`~jaxtrain.rundir.writers.Tracker`),
and sends first what a killed process had not written. Where each one writes:

- ``mlflow``: ``$MLFLOW_TRACKING_URI`` if set, else the SQLite store
  ``<workdir's parent>/mlflow.db`` (every run under ``runs/`` in one store:
  ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``); experiment = the
  experiment's name, run name = the run directory's.
- ``wandb``: ``<workdir>/wandb``; online when W&B has an API key (``wandb login``
  or ``$WANDB_API_KEY``), else offline (``wandb sync <workdir>/wandb/offline-run-*``
  uploads it later); ``$WANDB_MODE`` decides when set.
- ``trackio``: Trackio's local store (``$TRACKIO_DIR``, by default
  ``~/.cache/huggingface/trackio``; ``trackio show``); project = the experiment.

Each is an optional extra (``pip install 'jaxtrain[mlflow]'``); one that is not
installed is refused by :func:`check` before the run writes anything.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pathlib
import secrets
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.rundir import wandb_file
from jaxtrain.rundir.writers import Tracker

__all__ = ["FILE", "KNOWN", "MLflowTracker", "TrackioTracker", "WandbTracker", "check",
           "names", "open_trackers", "reopen"]

FILE = "trackers.json"  # the tracked runs' ids, in the run directory
# tracker -> the modules it needs (its extra, jaxtrain[<tracker>], installs them)
KNOWN = {"mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",),
         "trackio": ("trackio",)}


def names(track: str | Sequence[str] | None) -> tuple[str, ...]:
  """The trackers asked for: ``"mlflow,wandb"`` or a list; ``None``/``""``: none.

  >>> names("mlflow, wandb"), names(None)
  (('mlflow', 'wandb'), ())

  Raises:
    ValueError: an unknown tracker, named with the choices.
  """
  if not track:
    return ()
  items = track.split(",") if isinstance(track, str) else list(track)
  out = tuple(dict.fromkeys(str(i).strip().lower() for i in items))
  for item in out:
    if item not in KNOWN:
      raise ValueError(f"track: unknown tracker {item!r}; choose from {', '.join(KNOWN)}")
  return out


def check(track: str | Sequence[str] | None) -> tuple[str, ...]:
  """:func:`names`, refusing a tracker whose package is not installed.

  Raises:
    ValueError: one line naming the tracker and the extra that installs it.
  """
  wanted = names(track)
  for name, module in ((name, module) for name in wanted for module in KNOWN[name]):
    try:
      importlib.import_module(module)  # the tracker imports it next anyway
    except ImportError as error:
      raise ValueError(
          f"track: {name} is not installed ({type(error).__name__}: {module}): "
          f"pip install 'jaxtrain[{name}]' (or uv sync --extra {name})") from None
  return wanted


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
  return out


@contextlib.contextmanager
def _quiet():
  """The trackers' own start-up chatter off the terminal (the run says where
  each one writes, in one line)."""
  with contextlib.redirect_stdout(io.StringIO()):
    yield


class MLflowTracker(Tracker):
  """A run in an MLflow tracking store (see the module's doc for where)."""

  name = "mlflow"

  def __init__(self, workdir: pathlib.Path, *, experiment: str, config: Mapping[str, Any] | None,
               saved: Mapping[str, Any] | None = None):
    super().__init__()
    from mlflow.tracking import MlflowClient

    for logger in ("mlflow", "alembic"):  # the store's "Creating tables..." INFO lines
      logging.getLogger(logger).setLevel(logging.WARNING)

    saved = dict(saved or {})
    store = workdir.absolute().parent
    uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{store / 'mlflow.db'}")
    # Images go to the store's artifacts; for the default store, beside it
    # (MLflow's default would be ./mlruns, wherever the command runs).
    self._artifacts = (store / "mlartifacts").as_uri() if uri.endswith(
        f"{store / 'mlflow.db'}") else None
    self.client = MlflowClient(tracking_uri=uri)
    with warnings.catch_warnings():  # SQLAlchemy's deprecations inside MLflow's store
      warnings.simplefilter("ignore", DeprecationWarning)
      self._open(workdir, experiment, config, saved, uri)

  def _open(self, workdir, experiment, config, saved, uri):
    run = None
    if saved.get("run_id"):
      with contextlib.suppress(Exception):
        run = self.client.get_run(saved["run_id"])
      if run is None:
        warnings.warn(f"MLflow run {saved['run_id']} (trackers.json) is not in {uri}: "
                      "a new tracked run gets the run so far", stacklevel=2)
    if run is None:
      experiment_id = self._experiment(experiment)
      run = self.client.create_run(experiment_id, run_name=workdir.name,
                                   tags={"jaxtrain.workdir": str(workdir.absolute())})
      params = list(_flat(config or {}).items())
      from mlflow.entities import Param

      for i in range(0, len(params), 100):  # MLflow's limit per batch
        self.client.log_batch(run.info.run_id, params=[
            Param(k, v[:6000]) for k, v in params[i:i + 100]])
    else:
      self.client.update_run(run.info.run_id, status="RUNNING")
      for key in run.data.metrics:
        history = self.client.get_metric_history(run.info.run_id, key)
        self._last[key] = max(m.step for m in history)
    self.run_id, self.uri, self._pending = run.info.run_id, uri, []
    self._sent = int(time.time() * 1000)
    self.ids = {"run_id": self.run_id, "tracking_uri": uri}
    self.where = f"mlflow run {self.run_id} in {uri}"

  def _experiment(self, name: str) -> str:
    if (found := self.client.get_experiment_by_name(name)) is None:
      with contextlib.suppress(Exception):  # else another run created it meanwhile
        return self.client.create_experiment(name, artifact_location=self._artifacts)
    return (found or self.client.get_experiment_by_name(name)).experiment_id

  def send(self, step, scalars):
    """Logs the scalars at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    self._pending.extend(Metric(k, v, now, step) for k, v in scalars.items())
    if len(self._pending) >= 10_000 or now - self._sent > 5_000:  # every 5 s at most
      self.flush()

  def write_image(self, step, name, image):
    """Logs the image at ``step``."""
    self.flush()
    self.client.log_image(self.run_id, image, key=name, step=int(step))

  def flush(self):
    """Sends the buffered metrics (one batch per 1,000)."""
    pending, self._pending, self._sent = self._pending, [], int(time.time() * 1000)
    for i in range(0, len(pending), 1000):  # MLflow's limit per batch
      # ~0.1 ms a value in MLflow's SQLite store (its async queue was no faster).
      self.client.log_batch(self.run_id, metrics=pending[i:i + 1000])

  def close(self):
    """Flushes and ends the tracked run."""
    self.flush()
    self.client.set_terminated(self.run_id)


def _wandb_has_key() -> bool:
  if os.environ.get("WANDB_API_KEY"):
    return True
  import netrc

  try:
    hosts = netrc.netrc().hosts
  except (OSError, netrc.NetrcParseError):
    return False
  return any("wandb" in host for host in hosts)


class WandbTracker(Tracker):
  """A Weights & Biases run in ``<workdir>/wandb`` (online with an API key,
  else offline; ``$WANDB_MODE`` decides when set)."""

  name = "wandb"

  def __init__(self, workdir: pathlib.Path, *, experiment: str, config: Mapping[str, Any] | None,
               saved: Mapping[str, Any] | None = None):
    super().__init__()
    import wandb

    saved = dict(saved or {})
    run_id = saved.get("id") or secrets.token_hex(4)
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_key() else "offline")
    # What earlier sessions of this run wrote here (offline, or not yet synced).
    self._last.update(wandb_file.last_steps(
        sorted((workdir / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb"))))
    settings = wandb.Settings(silent=True, quiet=True, console="off", x_disable_stats=True,
                              save_code=False, disable_git=True, x_save_requirements=False)
    with _quiet():
      self.run = wandb.init(project=saved.get("project", experiment), id=run_id,
                            name=workdir.name, dir=str(workdir), mode=mode, resume="allow",
                            settings=settings, reinit="create_new")
      if config is not None:  # a continued run's epochs may differ: allowed
        self.run.config.update(dict(config), allow_val_change=True)
    if self.run.resumed and self.run.step:  # online: W&B keeps steps below this one
      for key in set(self._last) | {"*"}:
        self._last[key] = max(self._last.get(key, -1), int(self.run.step) - 1)
    self.ids = {"id": run_id, "project": saved.get("project", experiment)}
    self.where = (f"wandb {mode} run {run_id} in {workdir / 'wandb'}"
                  + (" (wandb sync uploads it)" if mode == "offline" else ""))

  def _new(self, step, scalars):
    floor = self._last.get("*", -1)  # online resume: every name up to W&B's step
    return super()._new(step, {k: v for k, v in scalars.items() if step > floor})

  def send(self, step, scalars):
    """Logs the scalars at ``step``."""
    self.run.log(dict(scalars), step=step)

  def write_histograms(self, step, values):
    """Logs W&B histograms (64 bins) not yet logged at ``step``."""
    import wandb

    fresh = {k: v for k, v in values.items() if int(step) > self._last.get(k, -1)}
    if fresh:
      self.run.log({k: wandb.Histogram(np_histogram=np.histogram(v, bins=64))
                    for k, v in fresh.items()}, step=int(step))
      self._last.update(dict.fromkeys(fresh, int(step)))

  def write_image(self, step, name, image):
    """Logs the image at ``step``."""
    import wandb

    self.run.log({name: wandb.Image(image)}, step=max(int(step), self.run.step or 0))

  def close(self):
    """Flushes and ends the tracked run."""
    with _quiet():
      self.run.finish()


class TrackioTracker(Tracker):
  """A run in Trackio's local store (``$TRACKIO_DIR``; ``trackio show``)."""

  name = "trackio"

  def __init__(self, workdir: pathlib.Path, *, experiment: str, config: Mapping[str, Any] | None,
               saved: Mapping[str, Any] | None = None):
    super().__init__()
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    saved = dict(saved or {})
    project = saved.get("project", experiment)
    name = saved.get("name") or f"{workdir.name}-{secrets.token_hex(3)}"
    for log in SQLiteStorage.get_logs(project, run=name):
      for key in log:
        if key not in ("step", "timestamp") and not key.startswith("_"):
          self._last[key] = max(self._last.get(key, -1), int(log["step"]))
    with _quiet():
      self.run = trackio.init(project=project, name=name,
                              config=None if config is None else dict(config),
                              resume="allow", auto_log_cpu=False, auto_log_gpu=False)
    self.ids = {"project": project, "name": name}
    self.where = f"trackio project {project} run {name} (trackio show --project {project})"

  def send(self, step, scalars):
    """Logs the scalars at ``step``."""
    self.run.log(dict(scalars), step=step)

  def write_image(self, step, name, image):
    """Logs the image at ``step``."""
    import trackio

    self.run.log({name: trackio.Image(image)}, step=int(step))

  def close(self):
    """Flushes and ends the tracked run."""
    import trackio

    with _quiet():
      self.run.finish()
    # Trackio finishes its current run again at exit (and says so): not this one.
    with contextlib.suppress(Exception):
      if trackio.context_vars.current_run.get() is self.run:
        trackio.context_vars.current_run.set(None)


_CLASSES = {"mlflow": MLflowTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def _saved(workdir: pathlib.Path) -> dict:
  try:
    return json.loads((workdir / FILE).read_text())
  except (OSError, ValueError):
    return {}


def open_trackers(track: str | Sequence[str] | None, workdir: str | os.PathLike, *,
                  experiment: str, config: Mapping[str, Any] | None) -> list[Tracker]:
  """Opens (or reopens, from ``<workdir>/trackers.json``) the tracked runs of
  ``track``, and records their ids there. ``config``: the run's config, given
  to a new tracked run (``None``: leave a reopened run's as it is)."""
  workdir = pathlib.Path(workdir)
  saved, trackers = _saved(workdir), []
  try:
    for name in check(track):
      try:
        trackers.append(_CLASSES[name](workdir, experiment=experiment, config=config,
                                       saved=saved.get(name)))
      except Exception as error:  # noqa: BLE001 - a bad store URI, a service that fails
        raise ValueError(f"track: {name} could not start ({type(error).__name__}: "
                         f"{(str(error).strip().splitlines() or [''])[0]})") from error
  except BaseException:
    for tracker in trackers:
      tracker.close()
    raise
  if trackers:
    ids = {**saved, **{t.name: t.ids for t in trackers}}
    (workdir / (FILE + ".tmp")).write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(workdir / (FILE + ".tmp"), workdir / FILE)
  return trackers


def reopen(workdir: str | os.PathLike) -> list[Tracker]:
  """The tracked runs a run directory's ``trackers.json`` names, reopened (to
  log an experiment's figures after its run, for instance)."""
  saved = _saved(pathlib.Path(workdir))
  return open_trackers([n for n in saved if n in KNOWN], workdir,
                       experiment=pathlib.Path(workdir).name, config=None)
