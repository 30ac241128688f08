"""Helpers shared by the experiment scripts: one training run as a record, mean ± std, and writing
the results directory (JSON, markdown with the command and machine at the top)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def train_record(config) -> dict:
    """Trains ``config`` (a ``jaxnet.app.run.RunConfig``) with the ``jaxnet train`` recipe.

    Returns:
      ``{"config", "num_params", "test_accuracy", "train_accuracy", "test_loss", "train_loss", "seconds",
      "examples_per_second", "compile_seconds", "wall_seconds"}`` (for a language model
      ``*_bits_per_char`` instead of the accuracies); the lists have one entry per epoch
      (``examples_per_second``: training only, evaluation excluded).
    """
    import jax

    from jaxnet.app.run import train

    start = time.perf_counter()
    state, history, _, _ = train(config, out_dir=None, progress=False)
    record = {"config": dataclasses.asdict(config),
              "num_params": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(state.params))}
    for key in ("test_accuracy", "train_accuracy", "test_bits_per_char", "train_bits_per_char",
                "test_loss", "train_loss", "seconds", "examples_per_second"):
        if key in history[0]:
            record[key] = [epoch[key] for epoch in history]
    record["compile_seconds"] = history[0]["compile_seconds"]
    record["wall_seconds"] = time.perf_counter() - start
    return record


def epochs_to_reach(accuracies: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose accuracy is >= ``target``; None if none is."""
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
    """``"90.41 ± 0.12"``: accuracies in percent by default."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import jax

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared; load "
            f"average {load} at start), jax {jax.__version__} on {jax.default_backend()}")


def commit() -> str:
    """The repository's current commit (short hash), or ``"unknown"`` outside a git checkout."""
    import subprocess

    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent, check=False)
    return result.stdout.strip() or "unknown"


def command() -> str:
    """The command line that ran this script, as typed from the repository root."""
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])
    return shlex.join(["python", script, *sys.argv[1:]])


def write_results(out_dir: Path, settings, records: list[dict], markdown: str, started: float,
                  header: dict) -> None:
    """Writes ``results.json`` (settings and every raw record) and ``results.md``.

    ``header`` holds ``command`` and ``machine``, taken when the script started.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    total = time.time() - started
    everything = {**header, "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                  "total_seconds": total, "settings": dataclasses.asdict(settings),
                  "records": records}
    (out_dir / "results.json").write_text(json.dumps(everything, indent=1))
    top = (f"Command: `{header['command']}`\n\n"
           f"Date: {everything['date']}; machine: {header['machine']}; "
           f"total wall time {total / 60:.1f} min.\n\n")
    (out_dir / "results.md").write_text(top + markdown.rstrip() + "\n")


def finish(settings, records: list[dict], markdown: str, plot, started: float, header: dict) -> None:
    """Writes the results (:func:`write_results`) and ``curves.png`` (``plot(settings, records,
    path)``) under ``RESULTS / settings.out`` and says where they are."""
    out_dir = RESULTS / settings.out
    write_results(out_dir, settings, records, markdown, started, header)
    plot(settings, records, out_dir / "curves.png")
    print(f"wrote {out_dir} in {(time.time() - started) / 60:.1f} min")


def save_epoch_figure(figure, axes, path) -> None:
    """Integer epoch ticks, a light grid and a legend on each of ``axes``; writes ``figure``."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
