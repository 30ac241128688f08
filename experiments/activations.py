"""Sigmoid vs ReLU (and tanh, GELU) as an MLP gets deeper.

Question: does the activation decide how well, and how fast, a plain MLP learns as it goes from
1 to 4 hidden layers? For each (dataset, activation, depth, seed) we train with the
``jaxnet train`` recipe (Adam 1e-3 with cosine decay, standardised inputs, no dropout) and
record the test accuracy after every epoch, the final test accuracy, and the first epoch that
reaches a target accuracy (95% on digits, 85% on Fashion-MNIST).

Run from the repository root:

    python experiments/activations.py            # full: 3 seeds digits, 2 Fashion-MNIST
    python experiments/activations.py --quick    # smoke test, well under a minute

Writes ``experiments/results/activations/``: ``results.json``, ``results.md``,
``accuracy_vs_depth.png``, ``learning_curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import common
from jaxnet.app.run import RunConfig


@dataclasses.dataclass(frozen=True)
class Recipe:  # how one data set is trained and judged
    seeds: int
    epochs: int
    width: int
    batch_size: int
    target: float


@dataclasses.dataclass(frozen=True)
class Settings:
    datasets: tuple[str, ...] = ("digits", "fashion-mnist")
    activations: tuple[str, ...] = ("sigmoid", "relu", "tanh", "gelu")
    depths: tuple[int, ...] = (1, 2, 3, 4)
    recipes: dict = dataclasses.field(default_factory=lambda: {
        "digits": Recipe(seeds=3, epochs=30, width=128, batch_size=32, target=0.95),
        "fashion-mnist": Recipe(seeds=2, epochs=8, width=128, batch_size=128, target=0.85)})
    out: str = "activations"


def parse_settings() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits,fashion-mnist")
    parser.add_argument("--seeds", type=int, help="seeds per dataset (default 3 digits, 2 Fashion-MNIST)")
    parser.add_argument("--epochs-digits", type=int, default=30)
    parser.add_argument("--epochs-fashion", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = parser.parse_args()
    epochs = {"digits": args.epochs_digits, "fashion-mnist": args.epochs_fashion}
    recipes = {name: dataclasses.replace(r, epochs=2 if args.quick else epochs[name],
                                         seeds=1 if args.quick else args.seeds or r.seeds)
               for name, r in Settings().recipes.items()}
    settings = Settings(datasets=tuple(args.datasets.split(",")), recipes=recipes)
    if args.quick:
        settings = dataclasses.replace(settings, activations=("sigmoid", "relu"), depths=(1, 3),
                                       out="activations/quick")
    return settings


def run_all(settings: Settings) -> list[dict]:
    records = []
    for dataset in settings.datasets:
        recipe = settings.recipes[dataset]
        for activation in settings.activations:
            for depth in settings.depths:
                for seed in range(recipe.seeds):
                    config = RunConfig(dataset=dataset, hidden=(recipe.width,) * depth,
                                       activation=activation, epochs=recipe.epochs,
                                       batch_size=recipe.batch_size, seed=seed)
                    record = common.train_record(config)
                    record.update(dataset=dataset, activation=activation, depth=depth, seed=seed,
                                  epochs_to_target=common.epochs_to_reach(
                                      record["test_accuracy"], recipe.target))
                    records.append(record)
                    print(f"{dataset} {activation} depth {depth} seed {seed}: "
                          f"{record['test_accuracy'][-1]:.4f} ({record['wall_seconds']:.1f} s)", flush=True)
    return records


def group(records, dataset, activation, depth) -> list[dict]:
    return [r for r in records if (r["dataset"], r["activation"], r["depth"]) == (dataset, activation, depth)]


def reach(runs: list[dict]) -> str:
    hits = [r["epochs_to_target"] for r in runs if r["epochs_to_target"] is not None]
    return f"{np.mean(hits):.1f} ({len(hits)}/{len(runs)})" if hits else f"never (0/{len(runs)})"


def tables(settings: Settings, records: list[dict]) -> str:
    text, header = [], ["activation"] + [f"depth {d}" for d in settings.depths]
    for dataset in settings.datasets:
        recipe = settings.recipes[dataset]
        table = lambda cell: common.markdown_table(header, [  # noqa: E731
            [a] + [cell(group(records, dataset, a, d)) for d in settings.depths] for a in settings.activations])
        text += [f"## {dataset}: width {recipe.width}, {recipe.epochs} epochs, batch {recipe.batch_size}, "
                 f"{recipe.seeds} seeds (0..{recipe.seeds - 1})\n",
                 "Final test accuracy (%), mean ± sample std over seeds:\n",
                 table(lambda runs: common.format_mean_std([r["test_accuracy"][-1] for r in runs])),
                 f"\nEpochs to reach {recipe.target:.0%} test accuracy: mean over the seeds that reached it "
                 "(seeds that reached it / seeds):\n", table(reach), ""]
    return "\n".join(text)


def plot(settings: Settings, records: list[dict], out_dir) -> None:
    datasets, depths = settings.datasets, settings.depths
    figure = Figure(figsize=(5 * len(datasets), 4))
    axes = figure.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for activation in settings.activations:
            stats = [common.mean_std([r["test_accuracy"][-1] for r in group(records, dataset, activation, d)])
                     for d in depths]
            ax.errorbar(depths, [100 * m for m, _ in stats], [100 * s for _, s in stats],
                        marker="o", capsize=3, label=activation)
        ax.set(title=dataset, xlabel="hidden layers", ylabel="final test accuracy (%)", xticks=depths)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy_vs_depth.png", dpi=100)

    figure = Figure(figsize=(3.2 * len(depths), 3 * len(datasets)))
    axes = figure.subplots(len(datasets), len(depths), squeeze=False, sharey="row")
    for row, dataset in zip(axes, datasets):
        for ax, depth in zip(row, depths):
            for activation in settings.activations:
                curves = 100 * np.array([r["test_accuracy"] for r in group(records, dataset, activation, depth)])
                epochs = np.arange(1, curves.shape[1] + 1)
                ax.plot(epochs, curves.mean(0), label=activation)
                ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.2)
            ax.axhline(100 * settings.recipes[dataset].target, color="gray", ls="--", lw=0.8)
            ax.set(title=f"{dataset}, depth {depth}", xlabel="epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        row[0].set_ylabel("test accuracy (%)")
        row[0].set_ylim(max(row[0].get_ylim()[0], 50), None)
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(out_dir / "learning_curves.png", dpi=100)


def main() -> None:
    settings = parse_settings()
    started, header = time.time(), {"command": common.command(), "machine": common.machine()}
    records = run_all(settings)
    out_dir = common.RESULTS / settings.out
    note = ("learning_curves.png: line = mean over seeds, band = min..max over seeds, y axis cut at 50%. "
            "Adam lr 1e-3, cosine decay, standardised inputs, no dropout (`jaxnet train` defaults).\n\n")
    common.write_results(out_dir, settings, records, note + tables(settings, records), started, header)
    plot(settings, records, out_dir)
    print(f"wrote {out_dir} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
