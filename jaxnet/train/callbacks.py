"""Callbacks for ``fit``: early stopping with the best state kept, logs and checkpoints.

A callback is any object with ``on_epoch_end(record, state) -> bool`` (``True`` stops training
after this epoch) and, optionally, ``on_train_end(state) -> state``. ``fit`` passes a copy of
the state that the callback may keep: the next epoch donates the original's buffers.

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
from typing import Any

from jaxnet.validate import positive_int


class EarlyStopping:
    """Stops when ``monitor`` has not improved for ``patience`` epochs; keeps the best state.

    Args:
      monitor: a record key, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      patience: epochs without improvement before stopping.
      mode: ``"min"`` or ``"max"``; by default ``"max"`` for accuracies, else ``"min"``.
      min_delta: the smallest change that counts as an improvement.
      restore_best: ``fit`` returns the state of the best epoch instead of the last.

    Attributes:
      best_epoch, best_value: the best epoch so far and its value (``None`` before any).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, mode: str | None = None,
                 min_delta: float = 0.0, restore_best: bool = True):
        self.monitor, self.patience = monitor, positive_int("EarlyStopping", "patience", patience)
        self.mode = mode or ("max" if "accuracy" in monitor else "min")
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.min_delta, self.restore_best = float(min_delta), restore_best
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.best_state: Any = None

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        sign = 1.0 if self.mode == "max" else -1.0
        return sign * (value - self.best_value) > self.min_delta

    def on_epoch_end(self, record: dict, state) -> bool:
        if self.monitor not in record:
            raise KeyError(f"EarlyStopping: no {self.monitor!r} in the epoch's record (has "
                           f"{', '.join(sorted(record))}); pass validation_data or "
                           "validation_split to fit")
        if self._improves(float(record[self.monitor])):
            self.best_epoch, self.best_value = record["epoch"], float(record[self.monitor])
            self.best_state = state if self.restore_best else None
        return record["epoch"] - (self.best_epoch or 0) >= self.patience

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
    """Appends each epoch's record to ``path`` as one line of strict JSON (NaN as ``null``)."""

    def __init__(self, path):
        self.path = Path(path)

    def on_epoch_end(self, record: dict, state) -> bool:
        with self.path.open("a") as f:
            f.write(strict_json(record) + "\n")
        return False


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
    """Saves an atomic, verified checkpoint (:func:`jaxnet.save_checkpoint`) every ``every``
    epochs into ``directory``, keeping the newest ``keep``; resume with
    ``fit(net, restore_checkpoint(latest_checkpoint(directory), template), ...)``."""

    def __init__(self, directory, every: int = 1, keep: int | None = 3):
        self.directory = Path(directory)
        self.every = positive_int("Checkpointer", "every", every)
        self.keep = keep

    def on_epoch_end(self, record: dict, state) -> bool:
        from jaxnet.checkpoint import save_checkpoint
        if record["epoch"] % self.every == 0:
            save_checkpoint(self.directory, state, metadata={"record": json.loads(strict_json(record))},
                            keep=self.keep)
        return False
