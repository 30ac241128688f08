"""Mixed precision on Fashion-MNIST: an MLP and a CNN trained in float32 and in bfloat16, over seeds.

Question: does bfloat16 training reach the float32 accuracy, and what does it cost or save in
time on this machine? ``bf16`` (``jaxnet.precision``) rounds the operands of every matrix product
(Dense, Conv; forward and backward) to bfloat16 and accumulates in float32, with float32
activations, params, gradients, optimizer state and loss: the form a CPU's bfloat16 matrix units
(AMX-BF16, AVX512-BF16) run fast. ``bf16-full`` (``--precisions f32,bf16,bf16-full``) runs the
whole forward pass in bfloat16, as ``bf16`` did before.

Recipe (as in ``experiments/fashion_mnist.py``, fewer epochs): MLP 784-512-512-10 with ReLU and
dropout 0.2, and the ``cnn`` model (conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-
dense(128)-relu-dense(10), dropout 0.2); AdamW (weight decay 1e-4), lr 1e-3 with cosine decay to
0, batch 128, inputs standardised with the training set's mean and std. Each seed trains every
precision from the same initial params and data order, one after the other, so that a change in
the machine's load hits all. The score is the test accuracy after the last epoch.

Run from the repository root:

    python experiments/precision.py                 # 3 seeds, MLP 8 and CNN 6 epochs
    python experiments/precision.py --models mlp --seeds 2
    python experiments/precision.py --quick         # 1 seed, 1 epoch per model

Writes ``experiments/results/precision/`` (``--quick``: ``precision/quick/``): ``results.json``,
``results.md``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from matplotlib.figure import Figure

import common
from jaxnet.app.run import RunConfig

COLORS = {"f32": "tab:blue", "bf16": "tab:orange", "bf16-full": "tab:green"}


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("mlp", "cnn")
    precisions: tuple[str, ...] = ("f32", "bf16")
    seeds: int = 3
    epochs_mlp: int = 8
    epochs_cnn: int = 6
    drop_rate: float = 0.2
    out: str = "precision"

    def epochs(self, model: str) -> int:
        return self.epochs_mlp if model == "mlp" else self.epochs_cnn


def parse_settings() -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(defaults.models), help="mlp, cnn or both")
    parser.add_argument("--precisions", default=",".join(defaults.precisions),
                        help="the first is the baseline of the time column")
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--epochs-mlp", type=int, default=defaults.epochs_mlp)
    parser.add_argument("--epochs-cnn", type=int, default=defaults.epochs_cnn)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch per model")
    args = parser.parse_args()
    settings = Settings(models=tuple(args.models.split(",")),
                        precisions=tuple(args.precisions.split(",")), seeds=args.seeds,
                        epochs_mlp=args.epochs_mlp, epochs_cnn=args.epochs_cnn)
    unknown = sorted(set(settings.models) - {"mlp", "cnn"})
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; use mlp, cnn or both")
    if args.quick:
        settings = dataclasses.replace(settings, seeds=1, epochs_mlp=1, epochs_cnn=1,
                                       out="precision/quick")
    return settings


def config(settings: Settings, model: str, precision: str, seed: int) -> RunConfig:
    """The run; ``RunConfig`` refuses an unknown precision."""
    return RunConfig(dataset="fashion-mnist", model=model, hidden=(512, 512), activation="relu",
                     drop_rate=settings.drop_rate, optimizer="adamw", weight_decay=1e-4, lr=1e-3,
                     schedule="cosine", batch_size=128, standardize=True, seed=seed,
                     epochs=settings.epochs(model), precision=precision,
                     validation_split=0)  # the score: the last epoch's test accuracy


def train_seconds(record: dict) -> list[float]:
    """Seconds of training per epoch (evaluation excluded), the first epoch left out when there
    are others: it compiles and warms caches up."""
    rows = 60000 * (1 - record["config"]["validation_split"])
    per_epoch = [rows / rate for rate in record["examples_per_second"]]
    return per_epoch[1:] or per_epoch


def runs_of(records: list[dict], model: str, precision: str) -> list[dict]:
    return [r for r in records if (r["model"], r["precision"]) == (model, precision)]


def table(settings: Settings, records: list[dict]) -> str:
    header = ["model", "precision", "seeds", "epochs", "final test acc (%)", "final train loss",
              "train s / epoch", f"time vs {settings.precisions[0]}", "compile (s)"]
    rows, differences = [], []
    for model in settings.models:
        base_runs = runs_of(records, model, settings.precisions[0])
        base = np.mean([s for r in base_runs for s in train_seconds(r)])
        for precision in settings.precisions:
            runs = runs_of(records, model, precision)
            seconds = np.mean([s for r in runs for s in train_seconds(r)])
            rows.append([model, precision, len(runs), settings.epochs(model),
                         common.format_mean_std([r["test_accuracy"][-1] for r in runs]),
                         common.format_mean_std([r["train_loss"][-1] for r in runs], scale=1,
                                                digits=4),
                         f"{seconds:.1f}", f"{seconds / base:.2f}x",
                         f"{np.mean([r['compile_seconds'] for r in runs]):.1f}"])
            if precision != settings.precisions[0]:
                gaps = [100 * (r["test_accuracy"][-1] - b["test_accuracy"][-1])
                        for r, b in zip(runs, base_runs)]
                differences.append(f"{model} {precision}: {', '.join(f'{d:+.2f}' for d in gaps)}")
    per_run = [[r["model"], r["precision"], r["seed"], f"{100 * r['test_accuracy'][-1]:.2f}",
                f"{100 * r['train_accuracy'][-1]:.2f}", f"{r['train_loss'][-1]:.4f}",
                f"{np.mean(train_seconds(r)):.1f}", f"{r['wall_seconds']:.0f}"] for r in records]
    return "\n".join([
        "Fashion-MNIST; MLP 784-512-512-10 and the `cnn` model, ReLU, dropout "
        f"{settings.drop_rate}, AdamW wd 1e-4, lr 1e-3 cosine to 0, batch 128, standardised "
        "inputs. `bf16`: bfloat16 operands in every matrix product (forward and backward), "
        "float32 accumulation, activations, params, gradients, optimizer state and loss; "
        "`bf16-full`: the whole forward pass in bfloat16 (`jaxnet.precision`). Mean ± sample "
        "std over seeds; each seed trains every precision from the same initial params and "
        "data order. Train seconds per epoch exclude evaluation and the first epoch; wall time "
        "on a CPU shared with other jobs.\n",
        common.markdown_table(header, rows),
        f"\nFinal test accuracy minus {settings.precisions[0]}'s, per seed (percentage points): "
        + "; ".join(differences) + ".\n",
        "Per run:\n",
        common.markdown_table(["model", "precision", "seed", "final test acc (%)",
                               "final train acc (%)", "final train loss", "train s / epoch",
                               "wall (s)"], per_run)])


def plot(settings: Settings, records: list[dict], path) -> None:
    figure = Figure(figsize=(10, 4 * len(settings.models)))
    axes = figure.subplots(len(settings.models), 2, squeeze=False)
    for (left, right), model in zip(axes, settings.models):
        for precision in settings.precisions:
            runs = runs_of(records, model, precision)
            for i, r in enumerate(runs):
                epochs = np.arange(1, len(r["test_accuracy"]) + 1)
                label = f"{precision} (seeds 0..{len(runs) - 1})" if i == 0 else None
                color = COLORS.get(precision)
                left.plot(epochs, 100 * np.array(r["test_accuracy"]), color=color, marker=".",
                          label=label)
                right.plot(epochs, r["train_loss"], color=color, marker=".", label=label)
        left.set(xlabel="epoch", ylabel="test accuracy (%)",
                 title=f"Fashion-MNIST {model}: test accuracy")
        right.set(xlabel="epoch", ylabel="train loss (dropout on)", title=f"{model}: training loss",
                  yscale="log")
    common.save_epoch_figure(figure, axes.ravel(), path)


def main() -> None:
    settings = parse_settings()
    runs = [config(settings, m, p, s) for m in settings.models for s in range(settings.seeds)
            for p in settings.precisions]  # built first: a bad --precisions fails before training
    started, header = time.time(), {"command": common.command(), "machine": common.machine()}
    records = []
    for run in runs:
        record = common.train_record(run)
        record.update(model=run.model, precision=run.precision, seed=run.seed)
        records.append(record)
        print(f"{run.model} {run.precision} seed {run.seed}: test "
              f"{record['test_accuracy'][-1]:.4f}, {np.mean(train_seconds(record)):.1f} "
              "train s/epoch", flush=True)
    common.finish(settings, records, table(settings, records), plot, started, header)


if __name__ == "__main__":
    main()
