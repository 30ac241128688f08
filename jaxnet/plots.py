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
