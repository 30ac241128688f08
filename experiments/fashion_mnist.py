"""Fashion-MNIST results table: the MLP and the small CNN of ``jaxnet train``, over seeds.

Question: what test accuracy do jaxnet's two classic networks reach on Fashion-MNIST with a
sound recipe, how much does it vary with the seed, and what does an epoch cost on this machine?

* MLP 784-512-512-10, ReLU, dropout 0.2 (target >= 89.5%).
* CNN conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-dense(128)-relu-dense(10), dropout 0.2
  before each dense layer (target >= 92.0%).

Both: AdamW (weight decay 1e-4), lr 1e-3 with cosine decay to 0, batch 128, inputs standardised
with the training set's mean and std. The score is the test accuracy after the last epoch; the
best epoch (chosen on the test set, so optimistic) is reported only as a diagnostic.

* ``cnn-aug`` (target >= 93.5%): a deeper CNN, (conv3x3-BatchNorm-relu) x2 at 32 and at 64
  channels, each pair followed by maxpool2, then dense(256) with dropout 0.3 before and after;
  trained through the Python API with on-device augmentation (random crop with 2 pixels of
  padding, horizontal flip), AdamW (weight decay 5e-4), lr 2e-3 cosine to 0. The last 5,000
  training images are held out for validation; the epoch with the best validation accuracy
  is kept (``EarlyStopping(restore_best=True)``) and only that model sees the test set, once.

Run from the repository root:

    python experiments/fashion_mnist.py                  # full (see results.md for its cost)
    python experiments/fashion_mnist.py --quick          # 1 seed, 1 epoch each
    python experiments/fashion_mnist.py --models cnn --seeds 1 --epochs-cnn 12

On XLA:CPU a CNN step inside ``fit``'s ``lax.scan`` costs ~2 s (8x a standalone jitted step),
about 15 min an epoch on 2 cores: run the CNN on an accelerator, or once ``fit`` is fixed.

Writes ``experiments/results/fashion_mnist/``: ``results.json``, ``results.md``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from matplotlib.figure import Figure

import common
from jaxnet.app.run import RunConfig

TARGETS = {"mlp": 0.895, "cnn": 0.920, "cnn-aug": 0.935}
VALIDATION_ROWS = 5000  # cnn-aug: the last training rows, held out to choose the epoch


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("mlp", "cnn")
    seeds: int = 2
    epochs_mlp: int = 20
    epochs_cnn: int = 10
    epochs_aug: int = 20
    drop_rate: float = 0.2
    out: str = "fashion_mnist"


def parse_settings() -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(defaults.models))
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--epochs-mlp", type=int, default=defaults.epochs_mlp)
    parser.add_argument("--epochs-cnn", type=int, default=defaults.epochs_cnn)
    parser.add_argument("--epochs-aug", type=int, default=defaults.epochs_aug)
    parser.add_argument("--drop-rate", type=float, default=defaults.drop_rate)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch per model")
    parser.add_argument("--out", default=defaults.out,
                        help="results directory under experiments/results (default: %(default)s)")
    args = parser.parse_args()
    settings = Settings(models=tuple(args.models.split(",")), seeds=args.seeds,
                        epochs_mlp=args.epochs_mlp, epochs_cnn=args.epochs_cnn,
                        epochs_aug=args.epochs_aug, drop_rate=args.drop_rate, out=args.out)
    if args.quick:
        settings = dataclasses.replace(settings, seeds=1, epochs_mlp=1, epochs_cnn=1, epochs_aug=1,
                                       out="fashion_mnist/quick")
    return settings


def config(settings: Settings, model: str, seed: int) -> RunConfig:
    return RunConfig(dataset="fashion-mnist", model=model, hidden=(512, 512), activation="relu",
                     drop_rate=settings.drop_rate, optimizer="adamw", weight_decay=1e-4, lr=1e-3,
                     schedule="cosine", batch_size=128, standardize=True, seed=seed,
                     epochs=settings.epochs_mlp if model == "mlp" else settings.epochs_cnn)


def augmented_cnn():
    """The ``cnn-aug`` network: two conv-BatchNorm-relu pairs per resolution, then dense(256)."""
    import jaxnet as jn

    def pair(channels):
        return [jn.Conv2D(channels, 3), jn.BatchNorm(), jn.relu,
                jn.Conv2D(channels, 3), jn.BatchNorm(), jn.relu, jn.MaxPool((2, 2))]

    return jn.serial(*pair(32), *pair(64), jn.Flatten(), jn.Dropout(0.3), jn.Dense(256), jn.relu,
                     jn.Dropout(0.3), jn.Dense(10))


def augmented_record(settings: Settings, seed: int) -> dict:
    """Trains ``cnn-aug`` (see the module docstring) and tests the validation-chosen epoch."""
    import functools

    import jax
    import optax

    import jaxnet as jn
    from jaxnet import augment
    from jaxnet.data import load_fashion_mnist
    from jaxnet.train.callbacks import EarlyStopping

    start = time.perf_counter()
    data = load_fashion_mnist()
    mean, std = data.x_train.mean(), data.x_train.std()
    x_train, x_test = (data.x_train - mean) / std, (data.x_test - mean) / std
    net = augmented_cnn()
    init_key, run_key = jax.random.split(jax.random.key(seed))
    params, model_state = net.init_with_state(init_key, x_train[:1])
    steps = settings.epochs_aug * -(-(len(x_train) - VALIDATION_ROWS) // 128)
    optimizer = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=5e-4)
    chooser = EarlyStopping(monitor=("val_accuracy", "val_loss"), patience=None,
                               restore_best=True)
    state, history = jn.fit(
        net, params, optimizer, (x_train, data.y_train), epochs=settings.epochs_aug,
        batch_size=128, model_state=model_state, key=run_key,
        validation_split=VALIDATION_ROWS / len(x_train), callbacks=[chooser],
        augment=augment.compose(functools.partial(augment.random_crop, padding=2),
                                augment.random_flip))
    test = jn.evaluate(net, state.params, (x_test, data.y_test), model_state=state.model_state)
    return {"num_params": sum(int(leaf.size) for leaf in jax.tree.leaves(state.params)),
            "val_accuracy": [r["val_accuracy"] for r in history],
            "train_accuracy": [r["train_accuracy"] for r in history],
            "seconds": [r["seconds"] for r in history],
            "compile_seconds": history[0]["compile_seconds"], "chosen_epoch": chooser.best_epoch,
            "test_accuracy": [test["accuracy"]], "test_loss": test["loss"],
            "wall_seconds": time.perf_counter() - start}


def table(settings: Settings, records: list[dict]) -> str:
    header = ["model", "seeds", "epochs", "final test acc (%)", "best test acc (%)", "best epoch per seed",
              "s / epoch", "compile (s)", "target", "met"]
    rows = []
    for model in settings.models:
        runs = [r for r in records if r["model"] == model]
        if model == "cnn-aug":
            continue
        final = [r["test_accuracy"][-1] for r in runs]
        best = [max(r["test_accuracy"]) for r in runs]
        # the first epoch is left out of the timing when there are others: it warms caches up
        seconds = [s for r in runs for s in (r["seconds"][1:] or r["seconds"])]
        rows.append([model, len(runs), len(runs[0]["test_accuracy"]), common.format_mean_std(final),
                     common.format_mean_std(best), ", ".join(str(int(np.argmax(r["test_accuracy"])) + 1) for r in runs),
                     f"{np.mean(seconds):.1f}", f"{np.mean([r['compile_seconds'] for r in runs]):.1f}",
                     f"{TARGETS[model]:.1%}", "yes" if np.mean(final) >= TARGETS[model] else "no"])
    per_seed = [[r["model"], r["seed"], f"{100 * r['test_accuracy'][-1]:.2f}", f"{100 * max(r['test_accuracy']):.2f}",
                 f"{100 * r['train_accuracy'][-1]:.2f}", f"{r['wall_seconds']:.0f}"]
                for r in records if r["model"] != "cnn-aug"]
    if not per_seed:  # cnn-aug alone
        return augmented_table(records).lstrip()
    return "\n".join([
        "AdamW wd 1e-4, lr 1e-3 cosine to 0, batch 128, standardised inputs, "
        f"dropout {settings.drop_rate}. Mean ± sample std over seeds; 'met' compares the mean final "
        "accuracy with the target. Best epoch is picked on the test set (optimistic, diagnostic only). "
        "Seconds are wall time on a CPU shared with other jobs.\n",
        common.markdown_table(header, rows), "\nPer run:\n",
        common.markdown_table(["model", "seed", "final test acc (%)", "best test acc (%)",
                               "final train acc (%)", "wall (s)"], per_seed),
        augmented_table(records)])


def augmented_table(records: list[dict]) -> str:
    runs = [r for r in records if r["model"] == "cnn-aug"]
    if not runs:
        return ""
    test = [r["test_accuracy"][-1] for r in runs]
    rows = [[r["seed"], len(r["val_accuracy"]), r["chosen_epoch"],
             f"{100 * r['val_accuracy'][r['chosen_epoch'] - 1]:.2f}",
             f"{100 * r['test_accuracy'][-1]:.2f}", f"{np.mean(r['seconds'][1:] or r['seconds']):.1f}",
             f"{r['wall_seconds']:.0f}"] for r in runs]
    met = "met" if np.mean(test) >= TARGETS["cnn-aug"] else "not met"
    return "\n".join([
        f"\n\ncnn-aug ({runs[0]['num_params']:,} params; augmentation, validation-chosen epoch): "
        f"test accuracy {common.format_mean_std(test)} over {len(runs)} seed(s); target "
        f"{TARGETS['cnn-aug']:.1%} {met}. The test set is evaluated once, on the chosen epoch.\n",
        common.markdown_table(["seed", "epochs", "chosen epoch", "val acc (%)", "test acc (%)",
                               "s / epoch", "wall (s)"], rows)])


def plot(settings: Settings, records: list[dict], path) -> None:
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    for model, color in zip(settings.models, ("tab:blue", "tab:orange", "tab:green")):
        runs = [r for r in records if r["model"] == model]
        if model == "cnn-aug":
            for i, r in enumerate(runs):
                epochs = np.arange(1, len(r["val_accuracy"]) + 1)
                ax.plot(epochs, 100 * np.array(r["val_accuracy"]), color=color, marker=".",
                        label=f"{model} validation" if i == 0 else None)
                ax.plot([r["chosen_epoch"]], [100 * r["test_accuracy"][-1]], color=color,
                        marker="*", ms=12, ls="", label=f"{model} test, chosen epoch" if i == 0 else None)
            ax.axhline(100 * TARGETS[model], color=color, ls="--", lw=0.8, label=f"{model} target")
            continue
        for i, r in enumerate(runs):
            epochs = np.arange(1, len(r["test_accuracy"]) + 1)
            ax.plot(epochs, 100 * np.array(r["test_accuracy"]), color=color, marker=".",
                    label=f"{model} test (seeds 0..{len(runs) - 1})" if i == 0 else None)
            ax.plot(epochs, 100 * np.array(r["train_accuracy"]), color=color, ls=":", alpha=0.6,
                    label=f"{model} train (dropout on)" if i == 0 else None)
        ax.axhline(100 * TARGETS[model], color=color, ls="--", lw=0.8, label=f"{model} target")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Fashion-MNIST", ylim=(84, 100))
    common.save_epoch_figure(figure, (ax,), path)


def main() -> None:
    settings = parse_settings()
    started, header = time.time(), {"command": common.command(), "machine": common.machine()}
    records = []
    for model in settings.models:
        for seed in range(settings.seeds):
            record = (augmented_record(settings, seed) if model == "cnn-aug"
                      else common.train_record(config(settings, model, seed)))
            record.update(model=model, seed=seed)
            records.append(record)
            print(f"{model} seed {seed}: test {record['test_accuracy'][-1]:.4f}, "
                  f"{np.mean(record['seconds']):.1f} s/epoch", flush=True)
    common.finish(settings, records, table(settings, records), plot, started, header)


if __name__ == "__main__":
    main()
