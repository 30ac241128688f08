"""Progress reporting for ``fit``: a rich progress bar fed from the device loop."""

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

    def __init__(self, epochs: int, steps_per_epoch: int):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
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
        self.bar.update(self.task, completed=(self.epoch - 1) * self.steps_per_epoch + int(step),
                        metrics=f"loss {float(sums.loss) / count:.4f}  "
                                f"acc {float(sums.correct) / count:.4f}")

    def end_epoch(self, record):
        test = (f"  test loss {record['test_loss']:.4f}  test acc {record['test_accuracy']:.4f}"
                if "test_loss" in record else "")
        self.bar.update(self.task, completed=record["epoch"] * self.steps_per_epoch,
                        metrics=f"loss {record['train_loss']:.4f}  acc "
                                f"{record['train_accuracy']:.4f}{test}")


def make_progress(progress: bool | None, epochs: int, steps_per_epoch: int) -> NoProgress:
    """A bar when ``progress`` is true, or when it is ``None`` and stderr is a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    return BarProgress(epochs, steps_per_epoch) if progress else NoProgress()
