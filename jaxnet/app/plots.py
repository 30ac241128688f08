"""Learning curves: loss and accuracy by epoch, train and test, as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path, title: str = "") -> None:
    """Writes loss (left) and accuracy (right) per epoch from ``fit``'s history to ``path``."""
    epochs = [record["epoch"] for record in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "test"):
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
    figure.savefig(Path(path), dpi=100)
    plt.close(figure)


def plot_population(history: list[dict], labels: list[str], path, title: str = "") -> None:
    """Training loss (left) and test accuracy (right) of every member of a population by epoch.

    Args:
      history: ``fit_population``'s history (per-member lists).
      labels: one legend label per member; members with the same label share a colour.
    """
    epochs = [record["epoch"] for record in history]
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("train_loss", "test_accuracy")):
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
    figure.savefig(Path(path), dpi=100)
    plt.close(figure)
