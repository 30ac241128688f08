"""Learning curves: loss and accuracy by epoch, train, validation and test, as a PNG.

Figures are built as ``matplotlib.figure.Figure`` objects and rendered straight to PNG bytes,
without pyplot: nothing here switches matplotlib's process-wide backend or registers figures
with pyplot, so a program (or notebook) that imports this keeps its own plotting setup. Each
PNG is written atomically (:func:`jaxnet.tensorfile.atomic_write`): a failure leaves the old
file, or none, never a truncated one.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from jaxnet.tensorfile import atomic_write


def save_figure(figure: Figure, path, dpi: int = 100) -> None:
    """Renders ``figure`` to PNG (with the Agg renderer, whatever the backend) and writes it to
    ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write(Path(path), buffer.getvalue())


def plot_curves(history: list[dict], path, title: str = "") -> None:
    """Writes loss (left) and accuracy (right; the mean absolute error for a regression run,
    which has none) per epoch from ``fit``'s history to ``path``."""
    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    right = "accuracy" if "train_accuracy" in history[0] else "mae"
    for ax, metric in zip(axes, ("loss", right)):
        for split in ("train", "val", "test"):  # test: each epoch's, when none is held out
            key = f"{split}_{metric}"
            if all(key in record for record in history):
                ax.plot(epochs, [record[key] for record in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_population(history: list[dict], labels: list[str], path, title: str = "") -> None:
    """Training loss (left) and validation accuracy (right; test accuracy for a history
    without validation) of every member of a population by epoch.

    Args:
      history: ``fit_population``'s history (per-member lists).
      labels: one legend label per member; members with the same label share a colour.
    """
    epochs = [record["epoch"] for record in history]
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    right = "val_accuracy" if "val_accuracy" in history[0] else "test_accuracy"
    for ax, key in zip(axes, ("train_loss", right)):
        shown = set()
        for i, label in enumerate(labels):
            ax.plot(epochs, [record[key][i] for record in history], color=colours[label],
                    alpha=0.7, linewidth=1, label=None if label in shown else label)
            shown.add(label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    if len(colours) > 1:
        axes[1].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
