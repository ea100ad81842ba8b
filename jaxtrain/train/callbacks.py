"""Callbacks: your own host code at epoch ends (or every N steps) of a compiled run.

A :class:`Callback` wraps a function of an :class:`Event` and says when it is
due: every ``every_epochs`` epochs and/or every ``every_steps`` steps. ``fit``
asks them through the run's cadence (:mod:`jaxtrain.train.cadence`, concern
``callbacks``), so a compiled call ends at a callback's epoch only when one is
due; between due points the run stays as compiled as without callbacks, and
nothing new is compiled for them.

The function answers with:

- ``None`` or ``False``: go on;
- ``True`` or a string: stop the run there (saved, like early stopping; the
  string, else ``"stopped by callback NAME"``, is the run's ``stop_reason``);
- a mapping ``{name: number}``: scalars to log at the event's step
  (TensorBoard ``callback/<name>`` in a run directory);
- a :class:`Reply`: any of these, and images to log at the event's step
  (TensorBoard and the run's trackers: a figure of samples, a custom plot).

A function that raises ends the run after a checkpoint at that point, with a
:class:`CallbackError` whose one line names the callback. A resumed run calls
callbacks at the due points after its checkpoint, the same ones as an
uninterrupted run (a run killed between a due point and its next checkpoint
calls the callbacks after that checkpoint again, as it redoes those steps).

The cost: a due point ends a compiled call and fetches its metrics at once (one
host sync, about what early stopping's per-epoch check costs), plus the time of
the function itself; in a multi-process run, one more small agreement.

>>> import jax, numpy as np, jaxtrain
>>> x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
>>> arrays = {"inputs": x, "targets": (x[:, 0] > 0).astype(np.int32)}
>>> state = jaxtrain.create_train_state(
...     jaxtrain.models.MLP(hidden_sizes=(8,), outputs=2), jaxtrain.make_optimizer("sgd", 0.5),
...     jax.random.key(0), x[:1], loss_fn=jaxtrain.losses.cross_entropy)
>>> seen = []
>>> def note(event):
...   seen.append(event.epoch)
...   return event.row["val_accuracy"] > 0.99  # True: stop here
>>> result = jaxtrain.fit(state, arrays, val=arrays, callbacks=[Callback(note, every_epochs=2)],
...                       config=jaxtrain.FitConfig(epochs=20, batch_size=16, progress=False))
stopped by callback note at step 24 (epoch 6)
>>> seen, result.stop_reason
([2, 4, 6], 'stopped by callback note')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtrain.engine import distributed
from jaxtrain.train.cadence import AnyOf, Every


class CallbackError(RuntimeError):
  """A callback raised (or answered something it may not); the message is one
  line naming it, and the run saved a checkpoint at that point first."""


@dataclasses.dataclass(frozen=True)
class Event:
  """What a callback gets at a due point.

  Attributes:
    step: the global step (updates done).
    epoch: the epochs completed.
    row: at an epoch end the epoch's row as logged (metrics.csv's columns:
      ``train_loss``, ``val_accuracy``, ...); at a step-only due point that
      step's record (``step``, ``loss``, ... as in steps.jsonl).
    state: the run's :class:`~jaxtrain.TrainState` as it is on the devices
      (device arrays, not a host copy): read it during the call (e.g.
      ``state.apply_fn``, ``jax.device_get(state.params)``); its arrays are
      donated to the next compiled call, so keep copies, not the arrays.
    end_of_epoch: whether ``step`` ends an epoch.
  """

  step: int
  epoch: int
  row: Mapping[str, Any]
  state: Any
  end_of_epoch: bool = True


@dataclasses.dataclass(frozen=True)
class Reply:
  """A callback's full answer: ``stop`` (True, or the stop reason), ``scalars``
  and ``images`` to log at the event's step (name -> an array ``[h, w]`` or
  ``[h, w, 1|3|4]``, a PNG file's path or a matplotlib figure; without a run
  directory they are not kept).

  >>> Reply(stop="good enough", scalars={"fid": 3.5}).stop
  'good enough'
  """

  stop: bool | str = False
  scalars: Mapping[str, float] = dataclasses.field(default_factory=dict)
  images: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Callback:
  """``fn(event)`` called every ``every_epochs`` epochs (0: not by epochs)
  and/or every ``every_steps`` steps (None or 0: not by steps).

  >>> cb = Callback(print, every_epochs=2)
  >>> cb.name, cb.due(8, steps_per_epoch=4), cb.due(12, steps_per_epoch=4)
  ('print', True, False)
  """

  fn: Callable[[Event], Any]
  every_epochs: int = 1
  every_steps: int | None = None
  name: str | None = None  # default: the function's name

  def __post_init__(self):
    if not callable(self.fn):
      raise ValueError(f"a callback must be callable, got {self.fn!r}")
    for field in ("every_epochs", "every_steps"):
      value = getattr(self, field)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 0):
        raise ValueError(f"Callback {field}={value!r}: expected an int >= 0")
    if not self.every_epochs and not self.every_steps:
      raise ValueError(f"Callback {self.label}: every_epochs and every_steps are both 0, "
                       "so it is never due")
    if self.name is None:
      object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))

  @property
  def label(self) -> str:
    """Its name in messages."""
    return self.name or getattr(self.fn, "__name__", type(self.fn).__name__)

  @property
  def every(self) -> Every:
    """Its cadence, as the run's :class:`~jaxtrain.train.cadence.Cadence` asks it."""
    return Every(steps=self.every_steps or 0, epochs=self.every_epochs)

  def due(self, step: int, steps_per_epoch: int) -> bool:
    """Whether it is due at the end of global step ``step``."""
    return self.every.due(step, steps_per_epoch)


def as_callbacks(callbacks: Sequence[Callback | Callable] | None) -> tuple[Callback, ...]:
  """``callbacks`` as :class:`Callback` objects (a plain function: every epoch).

  >>> [c.every_epochs for c in as_callbacks([print, Callback(print, every_epochs=3)])]
  [1, 3]
  """
  if callbacks is None:
    return ()
  if isinstance(callbacks, (Callback, str)) or callable(callbacks):
    raise ValueError(f"callbacks={callbacks!r}: expected a list of callbacks")
  return tuple(c if isinstance(c, Callback) else Callback(c) for c in callbacks)


def concern(callbacks: Sequence[Callback]) -> AnyOf:
  """The cadence concern that is due where any of ``callbacks`` is."""
  return AnyOf(tuple(c.every for c in callbacks))


def _reply(answer: Any, label: str) -> Reply:
  if answer is None or isinstance(answer, bool | str):
    return Reply(stop=answer or False)
  if isinstance(answer, Reply):
    return answer
  if isinstance(answer, Mapping):
    return Reply(scalars=answer)
  raise CallbackError(f"callback {label} returned {type(answer).__name__}: expected None, "
                      "a bool, a stop reason (str), a mapping of scalars or a Reply")


def respond(callbacks: Sequence[Callback], event: Event, steps_per_epoch: int, *,
            log_scalars: Callable[[int, dict], None] | None = None,
            log_images: Callable[[int, dict], None] | None = None
            ) -> tuple[str | None, CallbackError | None]:
  """Calls the callbacks due at ``event.step``, in order, and returns the run's
  stop reason (or None) and the error to raise once the run is saved (or
  None). Both are agreed by the processes of a run (one agreement), so that
  all of them stop, save and raise at the same boundary."""
  stop = error = None
  for callback in callbacks:
    if not callback.due(event.step, steps_per_epoch):
      continue
    try:
      reply = _reply(callback.fn(event), callback.label)
      scalars = {str(k): float(v) for k, v in reply.scalars.items()}
      if reply.images and log_images is not None:
        log_images(event.step, {str(k): v for k, v in reply.images.items()})
    except Exception as raised:  # noqa: BLE001 - the run saves, then says it in one line
      first = str(raised).splitlines()[0] if str(raised) else ""
      error = raised if isinstance(raised, CallbackError) else CallbackError(
          f"callback {callback.label} raised at step {event.step} (epoch {event.epoch}): "
          f"{type(raised).__name__}{': ' + first if first else ''}")
      error.__cause__ = raised if error is not raised else None
      break
    if scalars and log_scalars is not None:
      log_scalars(event.step, {k: v for k, v in scalars.items() if math.isfinite(v)})
    if reply.stop and stop is None:
      stop = reply.stop if isinstance(reply.stop, str) else f"stopped by callback {callback.label}"
  stops, fails = distributed.agree([stop is not None, error is not None], "max",
                                   name="callbacks")
  if fails and error is None:
    error = CallbackError(f"a callback raised in another process at step {event.step}")
  if stops and stop is None:
    stop = "stopped by a callback in another process"
  return stop, error
