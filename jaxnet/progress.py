"""Progress reporting for ``fit``: a rich progress bar fed from the device loop, or, when
stderr is not a terminal (a log file, CI, ``nohup``), one plain line per epoch."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class NoProgress:
    """Reports nothing."""

    active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start_epoch(self, epoch):
        pass

    def update(self, step, sums):
        pass

    def end_epoch(self, record):
        pass


class BarProgress(NoProgress):
    """One bar per run over all steps, its text showing the epoch's running loss and accuracy."""

    active = True

    def __init__(self, epochs: int, steps_per_epoch: int, accuracy: bool = True):
        self.epochs, self.steps_per_epoch, self.accuracy = epochs, steps_per_epoch, accuracy
        self.epoch = 0
        self.bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                            TimeElapsedColumn(), console=Console(stderr=True))
        self.task = self.bar.add_task("train", total=epochs * steps_per_epoch, epoch="",
                                      metrics="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start_epoch(self, epoch):
        self.epoch = epoch
        self.bar.update(self.task, epoch=f"{epoch}/{self.epochs}",
                        completed=(epoch - 1) * self.steps_per_epoch)

    def update(self, step, sums):
        """Called from the device loop with the step within the epoch and the running sums."""
        count = max(float(sums.count), 1.0)
        accuracy = f"  acc {float(sums.correct) / count:.4f}" if self.accuracy else ""
        self.bar.update(self.task, completed=(self.epoch - 1) * self.steps_per_epoch + int(step),
                        metrics=f"loss {float(sums.loss) / count:.4f}{accuracy}")

    def end_epoch(self, record):
        self.bar.update(self.task, completed=record["epoch"] * self.steps_per_epoch,
                        metrics="  ".join(_metric_parts(record)))


_NOT_METRICS = ("epoch", "seconds", "examples_per_second", "compile_seconds", "skipped_batches")


def _metric_parts(record: dict) -> list[str]:
    """``["train loss 0.1234", "train acc 0.9800", "val loss ...", ...]`` in record order."""
    return [f"{key.replace('_accuracy', '_acc').replace('_', ' ')} {value:.4f}"
            for key, value in record.items()
            if key not in _NOT_METRICS and isinstance(value, (int, float))]


def format_epoch(record: dict, epochs: int) -> str:
    """One line for an epoch's record: epoch, train, validation and test metrics, seconds."""
    parts = [f"epoch {record['epoch']}/{epochs}", *_metric_parts(record)]
    if record.get("skipped_batches"):
        parts.append(f"skipped {record['skipped_batches']} batches")
    if "seconds" in record:
        parts.append(f"{record['seconds']:.2f} s")
    return "  ".join(parts)


class LineProgress(NoProgress):
    """One complete line per epoch on stderr, written when the epoch ends: for logs, where a
    progress bar would be drawn once, at the end, cut to 80 columns."""

    def __init__(self, epochs: int, file=None):
        self.epochs, self.file = epochs, file

    def end_epoch(self, record):
        print(format_epoch(record, self.epochs), file=self.file or sys.stderr, flush=True)


def _interactive() -> bool:
    """Whether stderr shows a live display (a terminal or a notebook), as rich sees it."""
    console = Console(stderr=True)
    return console.is_terminal or console.is_jupyter


def make_progress(progress: bool | None, epochs: int, steps_per_epoch: int,
                  accuracy: bool = True) -> NoProgress:
    """What ``fit``'s ``progress`` asks for.

    ``None``: a bar when stderr is a terminal, else nothing. ``True``: a bar where it can be
    shown live (a terminal or a notebook), else one line per epoch (:class:`LineProgress`).
    ``False``: nothing.
    """
    if progress is None:
        return BarProgress(epochs, steps_per_epoch, accuracy) if sys.stderr.isatty() else NoProgress()
    if not progress:
        return NoProgress()
    return BarProgress(epochs, steps_per_epoch, accuracy) if _interactive() else LineProgress(epochs)
