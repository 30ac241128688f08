"""Callbacks for ``fit``: early stopping with the best state kept, logs and checkpoints.

A callback is any object with ``on_epoch_end(record, state) -> bool`` (``True`` stops training
after this epoch) and, optionally, ``on_train_end(state) -> state``. One with an ``every_steps =
N`` attribute also has ``on_step_end(step, record, state)``, called after steps ``N, 2N, ...`` of
each epoch (``fit`` then runs the epoch's compiled program in segments of steps; the results
are bitwise the same): ``step`` is the global step, ``record`` ``{"epoch", "step",
"train_loss", ...}`` the means over the epoch's steps so far. ``fit`` passes a copy of the
state that the callback may keep: the next epoch or segment donates the original's buffers.

Example:
  >>> stop = EarlyStopping(monitor="val_loss", patience=3)
  >>> state, history = jn.fit(net, params, optax.adam(1e-3), (x, y), epochs=50,
  ...                         validation_split=0.1, callbacks=[stop, JSONLogger("log.jsonl")])
  >>> stop.best_epoch   # the state returned is that epoch's
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import jaxnet.sharding as sharding
from jaxnet.validate import positive_int

# How runs and sweep members are chosen: the validation loss, a smooth measure that a small
# validation set ranks far more reliably than its accuracy (one example is a whole step of it).
VALIDATION = "val_loss"


def default_mode(key: str) -> str:
    """``"max"`` for accuracies, ``"min"`` for everything else (losses, errors)."""
    return "max" if "accuracy" in key else "min"


def improves(values: Sequence[float], best: Sequence[float] | None, modes: Sequence[str],
             min_delta: float = 0.0) -> bool:
    """Whether ``values`` beat ``best`` (``None``: nothing yet), compared key by key.

    ``values`` and ``best`` hold one number per monitored key; the first key must improve by
    more than ``min_delta``, or be equal and the next keys decide, in order (accuracy first,
    ties broken by the loss). A NaN or infinite value never improves.
    """
    if not all(math.isfinite(v) for v in values):
        return False
    if best is None:
        return True
    for index, (value, old, mode) in enumerate(zip(values, best, modes)):
        gain = value - old if mode == "max" else old - value
        if gain > (min_delta if index == 0 else 0.0):
            return True
        if value != old:
            return False
    return False


def best_index(rows: Sequence[Sequence[float]], modes: Sequence[str]) -> int | None:
    """The index of the best of ``rows`` by :func:`improves` (the first of equal ones), or
    ``None`` when no row is finite."""
    best = None
    for index, values in enumerate(rows):
        if improves(values, None if best is None else rows[best], modes):
            best = index
    return best


class EarlyStopping:
    """Stops when ``monitor`` has not improved for ``patience`` epochs; keeps the best state.

    Args:
      monitor: a record key, e.g. ``"val_loss"`` or ``"val_accuracy"``, or several compared
        in order, ties on one broken by the next (``("val_accuracy", "val_loss")``).
      patience: epochs without improvement before stopping; ``None``: never stops (only
        keeps the best state).
      mode: ``"min"`` or ``"max"`` (one per key for several); by default ``"max"`` for
        accuracies, else ``"min"``.
      min_delta: the smallest change of the first key that counts as an improvement.
      restore_best: ``fit`` returns the state of the best epoch instead of the last.

    Attributes:
      best_epoch, best_value: the best epoch so far and its value of the first key
        (``None`` before any); ``best_values``: its values of every key.
    """

    def __init__(self, monitor: str | Sequence[str] = "val_loss", patience: int | None = 5,
                 mode: str | Sequence[str] | None = None, min_delta: float = 0.0,
                 restore_best: bool = True):
        self.monitor = (monitor,) if isinstance(monitor, str) else tuple(monitor)
        if not self.monitor:
            raise ValueError("EarlyStopping: monitor needs at least one record key")
        self.patience = None if patience is None else positive_int("EarlyStopping", "patience",
                                                                    patience)
        modes = [mode] * len(self.monitor) if mode is None or isinstance(mode, str) else list(mode)
        self.modes = tuple(m or default_mode(key) for m, key in zip(modes, self.monitor))
        if len(modes) != len(self.monitor) or not set(self.modes) <= {"min", "max"}:
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max' (one per monitored "
                             f"key, {len(self.monitor)}), got {mode!r}")
        self.min_delta, self.restore_best = float(min_delta), restore_best
        self.best_epoch: int | None = None
        self.best_values: tuple[float, ...] | None = None
        self.best_state: Any = None

    @property
    def best_value(self) -> float | None:
        return None if self.best_values is None else self.best_values[0]

    def _sees(self, record: dict) -> bool:
        """Takes the epoch's record in; whether it is the best so far."""
        if missing := [key for key in self.monitor if key not in record]:
            raise KeyError(f"EarlyStopping: no {missing[0]!r} in the epoch's record (has "
                           f"{', '.join(sorted(record))}); pass validation_data or "
                           "validation_split to fit")
        values = tuple(float(record[key]) for key in self.monitor)
        if not improves(values, self.best_values, self.modes, self.min_delta):
            return False
        self.best_epoch, self.best_values = record["epoch"], values
        return True

    def on_epoch_end(self, record: dict, state) -> bool:
        if self._sees(record) and self.restore_best:
            self.best_state = state
        return (self.patience is not None
                and record["epoch"] - (self.best_epoch or 0) >= self.patience)

    def resume(self, history: Sequence[dict], best_state) -> None:
        """Continues a run from a checkpoint: the best epoch from ``history`` (the records of
        the epochs done) and ``best_state``, that epoch's state as it was kept."""
        for record in history:
            self._sees(record)
        self.best_state = best_state if self.restore_best and self.best_epoch else None

    def on_train_end(self, state):
        return self.best_state if self.restore_best and self.best_state is not None else state


def strict_json(record: dict) -> str:
    """``record`` as one line of strict JSON: NaN and infinities become ``null``."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    return json.dumps({key: clean(value) for key, value in record.items()}, allow_nan=False)


class JSONLogger:
    """Appends each epoch's record to ``path`` as one line of strict JSON (NaN as ``null``);
    with ``every_steps=N``, also the step records after steps ``N, 2N, ...`` of each epoch
    (they have a ``step``)."""

    def __init__(self, path, every_steps: int | None = None):
        self.path = Path(path)
        self.every_steps = every_steps

    def on_epoch_end(self, record: dict, state) -> bool:
        with self.path.open("a") as f:
            f.write(strict_json(record) + "\n")
        return False

    def on_step_end(self, step: int, record: dict, state) -> None:
        self.on_epoch_end(record, state)


class CSVLogger:
    """Appends each epoch's record to the CSV file ``path``, with a header line first."""

    def __init__(self, path):
        self.path, self.fields = Path(path), None

    def on_epoch_end(self, record: dict, state) -> bool:
        new = self.fields is None
        self.fields = self.fields or list(record)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        return False


class TensorBoard:
    """Writes each epoch's numbers as TensorBoard scalars to ``logdir`` (needs the
    ``tensorboard`` extra: ``pip install "jaxnet[tensorboard]"``, i.e. tensorboardX)."""

    def __init__(self, logdir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as error:
            raise ImportError("TensorBoard: needs tensorboardX; pip install "
                              "'jaxnet[tensorboard]'") from error
        self.writer = SummaryWriter(str(logdir))

    def on_epoch_end(self, record: dict, state) -> bool:
        for name, value in record.items():
            if name != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, record["epoch"])
        self.writer.flush()
        return False

    def on_train_end(self, state):
        self.writer.close()
        return state


class Checkpointer:
    """Saves an atomic, verified checkpoint (:func:`jaxnet.save_checkpoint`) into
    ``directory`` every ``every`` epochs and, with ``every_steps=N``, after steps ``N, 2N,
    ...`` of each epoch too, keeping the newest ``keep``.

    Resume with ``fit(net, restore_checkpoint(latest_checkpoint(directory), template), ...)``.
    A state sharded over a mesh (``fit(..., mesh=, rules=)``) is saved through Orbax instead,
    each process writing its shards (:func:`jaxnet.sharded_checkpoint.save_sharded`): resume
    with ``restore_sharded(latest_sharded(directory), template, mesh, specs)``. Given a
    mid-epoch checkpoint, ``fit`` finishes that epoch first, and the final state is
    bitwise that of an uninterrupted run (the resumed epoch's train metrics cover only the
    steps it ran). Each manifest's metadata holds the ``record`` (epoch or step record).

    Args:
      every: epochs between checkpoints at the end of an epoch; ``None``: none there.
      every_steps: steps between checkpoints within each epoch (counted from its start).
      keep: the newest checkpoints kept (``None``: all).
    """

    def __init__(self, directory, every: int | None = 1, keep: int | None = 3,
                 every_steps: int | None = None):
        self.directory = Path(directory)
        self.every = None if every is None else positive_int("Checkpointer", "every", every)
        self.every_steps = None if every_steps is None else positive_int(
            "Checkpointer", "every_steps", every_steps)
        self.keep = keep

    def _save(self, record: dict, state) -> None:
        metadata = {"record": json.loads(strict_json(record))}
        if sharding.is_sharded(state):  # every process writes its own shards
            from jaxnet.sharded_checkpoint import save_sharded
            save_sharded(self.directory, state, metadata=metadata, keep=self.keep)
        else:
            from jaxnet.checkpoint import save_checkpoint
            save_checkpoint(self.directory, state, metadata=metadata, keep=self.keep)

    def on_epoch_end(self, record: dict, state) -> bool:
        if self.every is not None and record["epoch"] % self.every == 0:
            self._save(record, state)
        return False

    def on_step_end(self, step: int, record: dict, state) -> None:
        self._save(record, state)
