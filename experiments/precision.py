"""Mixed precision on Fashion-MNIST: the same MLP trained in float32 and in bfloat16, over seeds.

Question: does a bfloat16 forward pass (float32 params, gradients, optimizer state and loss;
``jaxnet.precision``'s ``"bf16"`` policy) reach the float32 accuracy, and what does it cost or
save in time on this machine?

Recipe (as in ``experiments/fashion_mnist.py``, fewer epochs): MLP 784-512-512-10, ReLU,
dropout 0.2, AdamW (weight decay 1e-4), lr 1e-3 with cosine decay to 0, batch 128, inputs
standardised with the training set's mean and std. Each seed trains both precisions from the
same initial params and data order, one after the other, so that a change in the machine's load
hits both. The score is the test accuracy after the last epoch.

On a CPU, XLA:CPU compiles a bfloat16 matrix product as float32 (convert, float32 dot, convert
back), so bfloat16 runs slower than float32; the time column is there to show it, not to
predict an accelerator's speed-up (see ``benchmarks/accelerator.py`` for that).

Run from the repository root:

    python experiments/precision.py                 # 2 seeds, 8 epochs (~10 min on 2 cores)
    python experiments/precision.py --quick         # 1 seed, 1 epoch

Writes ``experiments/results/precision/``: ``results.json``, ``results.md``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from matplotlib.figure import Figure

import common
from jaxnet.app.run import RunConfig

PRECISIONS = ("f32", "bf16")


@dataclasses.dataclass(frozen=True)
class Settings:
    seeds: int = 2
    epochs: int = 8
    hidden: tuple[int, ...] = (512, 512)
    drop_rate: float = 0.2
    out: str = "precision"


def parse_settings() -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch")
    args = parser.parse_args()
    settings = Settings(seeds=args.seeds, epochs=args.epochs)
    if args.quick:
        settings = dataclasses.replace(settings, seeds=1, epochs=1, out="precision/quick")
    return settings


def config(settings: Settings, precision: str, seed: int) -> RunConfig:
    return RunConfig(dataset="fashion-mnist", model="mlp", hidden=settings.hidden, activation="relu",
                     drop_rate=settings.drop_rate, optimizer="adamw", weight_decay=1e-4, lr=1e-3,
                     schedule="cosine", batch_size=128, standardize=True, seed=seed,
                     epochs=settings.epochs, precision=precision)


def train_seconds(record: dict) -> list[float]:
    """Seconds of training per epoch (evaluation excluded), the first epoch left out when there
    are others: it warms caches up."""
    per_epoch = [60000 / rate for rate in record["examples_per_second"]]
    return per_epoch[1:] or per_epoch


def table(settings: Settings, records: list[dict]) -> str:
    header = ["precision", "seeds", "epochs", "final test acc (%)", "final train loss",
              "train s / epoch", "time vs f32", "compile (s)"]
    base = np.mean([s for r in records if r["precision"] == "f32" for s in train_seconds(r)])
    rows = []
    for precision in PRECISIONS:
        runs = [r for r in records if r["precision"] == precision]
        seconds = np.mean([s for r in runs for s in train_seconds(r)])
        rows.append([precision, len(runs), settings.epochs,
                     common.format_mean_std([r["test_accuracy"][-1] for r in runs]),
                     common.format_mean_std([r["train_loss"][-1] for r in runs], scale=1, digits=4),
                     f"{seconds:.1f}", f"{seconds / base:.2f}x",
                     f"{np.mean([r['compile_seconds'] for r in runs]):.1f}"])
    by_seed = {(r["precision"], r["seed"]): r for r in records}
    differences = [100 * (by_seed["bf16", s]["test_accuracy"][-1] - by_seed["f32", s]["test_accuracy"][-1])
                   for s in range(settings.seeds)]
    per_run = [[r["precision"], r["seed"], f"{100 * r['test_accuracy'][-1]:.2f}",
                f"{100 * r['train_accuracy'][-1]:.2f}", f"{r['train_loss'][-1]:.4f}",
                f"{np.mean(train_seconds(r)):.1f}", f"{r['wall_seconds']:.0f}"] for r in records]
    return "\n".join([
        f"MLP 784-{'-'.join(map(str, settings.hidden))}-10, ReLU, dropout {settings.drop_rate}, "
        "AdamW wd 1e-4, lr 1e-3 cosine to 0, batch 128, standardised inputs. `bf16`: float32 "
        "params, gradients, optimizer state and loss, bfloat16 forward and backward matrix "
        "products (`jaxnet.precision`). Mean ± sample std over seeds; each seed trains both "
        "precisions from the same initial params and data order. Train seconds per epoch exclude "
        "evaluation and the first epoch; wall time on a CPU shared with other jobs.\n",
        common.markdown_table(header, rows),
        f"\nbf16 minus f32 final test accuracy, per seed (percentage points): "
        f"{', '.join(f'{d:+.2f}' for d in differences)}.\n",
        "Why bfloat16 is slower here: XLA:CPU (jax 0.10.2) compiles a bfloat16 matrix product "
        "as a conversion of both operands to float32, a float32 product and a conversion back "
        "(visible in the compiled HLO), so bfloat16 only adds work on this CPU. On an "
        "accelerator with bfloat16 matrix units it is the fast path; see "
        "`benchmarks/accelerator.py`.\n",
        "Per run:\n",
        common.markdown_table(["precision", "seed", "final test acc (%)", "final train acc (%)",
                               "final train loss", "train s / epoch", "wall (s)"], per_run)])


def plot(settings: Settings, records: list[dict], path) -> None:
    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for precision, color in zip(PRECISIONS, ("tab:blue", "tab:orange")):
        runs = [r for r in records if r["precision"] == precision]
        for i, r in enumerate(runs):
            epochs = np.arange(1, len(r["test_accuracy"]) + 1)
            label = f"{precision} (seeds 0..{len(runs) - 1})" if i == 0 else None
            left.plot(epochs, 100 * np.array(r["test_accuracy"]), color=color, marker=".", label=label)
            right.plot(epochs, r["train_loss"], color=color, marker=".", label=label)
    left.set(xlabel="epoch", ylabel="test accuracy (%)", title="Fashion-MNIST MLP: test accuracy")
    right.set(xlabel="epoch", ylabel="train loss (dropout on)", title="training loss", yscale="log")
    common.save_epoch_figure(figure, (left, right), path)


def main() -> None:
    settings = parse_settings()
    started, header = time.time(), {"command": common.command(), "machine": common.machine()}
    records = []
    for seed in range(settings.seeds):
        for precision in PRECISIONS:
            record = common.train_record(config(settings, precision, seed))
            record.update(precision=precision, seed=seed)
            records.append(record)
            print(f"{precision} seed {seed}: test {record['test_accuracy'][-1]:.4f}, "
                  f"{np.mean(train_seconds(record)):.1f} train s/epoch", flush=True)
    common.finish(settings, records, table(settings, records), plot, started, header)


if __name__ == "__main__":
    main()
