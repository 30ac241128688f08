"""Seed variance and a learning-rate x seed grid of the classic network, each one compiled run.

Questions: how much does the test accuracy of the classic network (the ``jaxnet train``
default: MLP 256-256, ReLU, Adam with cosine decay, 30 epochs on digits) vary with the seed
alone, and how does it depend on the learning rate? Both are answered by training every member
at once as a population (``jaxnet.app.sweep``): each member shuffles with its own seed, exactly as
``jaxnet train --seed S --lr LR`` would. For scale, one member is also trained alone with
``jaxnet train``'s code path, and its time is multiplied by the number of members.

Run from the repository root:

    python experiments/population.py            # 32 seeds; 6 learning rates x 8 seeds
    python experiments/population.py --quick    # smoke test

Writes ``experiments/results/population/``: ``results.json``, ``results.md``,
``seed_variance.png``, ``lr_grid.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from matplotlib.figure import Figure

import common
from jaxnet.app.run import RunConfig
from jaxnet.app.sweep import sweep


@dataclasses.dataclass(frozen=True)
class Settings:
    seeds: int = 32
    grid_seeds: int = 8
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    epochs: int = 30


def seed_variance(base: RunConfig, settings: Settings) -> dict:
    results = sweep(base, settings.seeds, {}, None, progress=False)
    start = time.perf_counter()
    alone = common.train_record(base)  # member 0, trained alone
    alone_seconds = time.perf_counter() - start
    accuracy = [m["test_accuracy"] for m in results["members"]]
    return {"results": results, "accuracy": accuracy, "alone": alone,
            "alone_seconds": alone_seconds}


def plot_seed_variance(accuracy: list[float], path) -> None:
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    ax.hist(np.asarray(accuracy) * 100, bins=12, color="C0", alpha=0.8)
    mean, std = common.mean_std(accuracy)
    ax.axvline(mean * 100, color="k", linestyle="--", label=f"mean {mean:.2%} ± {std:.2%}")
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("seeds")
    ax.set_title(f"classic MLP on digits: {len(accuracy)} seeds")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_lr_grid(results: dict, path) -> None:
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    members = results["members"]
    ax.scatter([m["lr"] for m in members], [m["test_accuracy"] * 100 for m in members],
               s=12, alpha=0.5, color="C0", label="one seed")
    settings = results["settings"]
    ax.errorbar([s["lr"] for s in settings], [s["test_accuracy_mean"] * 100 for s in settings],
                yerr=[s["test_accuracy_std"] * 100 for s in settings], color="k", marker="o",
                capsize=3, label="mean ± std")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (Adam, cosine decay)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few seeds and epochs")
    args = parser.parse_args()
    settings = Settings(seeds=4, grid_seeds=2, lrs=(1e-3, 1e-2), epochs=2) if args.quick else Settings()
    header = {"command": common.command(), "machine": common.machine()}
    started = time.time()
    base = RunConfig(epochs=settings.epochs)

    variance = seed_variance(base, settings)
    grid = sweep(base, settings.grid_seeds, {"lr": settings.lrs}, None, progress=False)
    out = common.RESULTS / "population"
    out.mkdir(parents=True, exist_ok=True)
    plot_seed_variance(variance["accuracy"], out / "seed_variance.png")
    plot_lr_grid(grid, out / "lr_grid.png")

    k = settings.seeds
    population_seconds = variance["results"]["seconds"]
    sequential = variance["alone"]["wall_seconds"] * k
    rows = [[f"{s['lr']:g}", s["seeds"], f"{s['test_accuracy_mean']:.2%} ± {s['test_accuracy_std']:.2%}",
             f"{s['test_accuracy_min']:.2%}", f"{s['test_accuracy_max']:.2%}", s["diverged"]]
            for s in grid["settings"]]
    markdown = (
        f"# Seed variance and learning rate of the classic network\n\n"
        f"Network: the `jaxnet train` default (MLP 256-256 ReLU, Adam with cosine decay, batch "
        f"32, standardised digits, {settings.epochs} epochs). Each experiment is one population "
        f"trained in one compiled program; every member shuffles with its own seed, as "
        f"`jaxnet train --seed S` does.\n\n"
        f"## Seed variance ({k} seeds)\n\n"
        f"Test accuracy **{common.format_mean_std(variance['accuracy'])}%** (mean ± sample std), "
        f"min {min(variance['accuracy']):.2%}, max {max(variance['accuracy']):.2%}. The ensemble "
        f"of all {k} (mean of probabilities): {variance['results']['ensemble']['test_accuracy']:.2%}.\n\n"
        f"Time: the population of {k} trained in {population_seconds:.1f} s (fit, compilation "
        f"included); one member alone took {variance['alone']['wall_seconds']:.1f} s, so "
        f"{k} in sequence would take ~{sequential:.0f} s: **{sequential / population_seconds:.1f}x**"
        f" faster as a population. Member 0 alone reached "
        f"{variance['alone']['test_accuracy'][-1]:.2%}; in the population "
        f"{variance['accuracy'][0]:.2%}.\n\n![seed variance](seed_variance.png)\n\n"
        f"## Learning rate x seed ({len(settings.lrs)} x {settings.grid_seeds})\n\n"
        + common.markdown_table(["peak lr", "seeds", "test accuracy (mean ± std)", "min", "max",
                                 "diverged"], rows)
        + f"\n\nTrained in {grid['seconds']:.1f} s.\n\n![learning rate grid](lr_grid.png)\n")
    records = [{"experiment": "seed_variance", **variance["results"],
                "alone": variance["alone"], "alone_seconds": variance["alone_seconds"]},
               {"experiment": "lr_grid", **grid}]
    common.write_results(out, settings, records, markdown, started, header)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
