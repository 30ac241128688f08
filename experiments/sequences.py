"""Sequence models side by side: LSTM, GRU and a transformer on sequential Fashion-MNIST and
on a character-level language model of the Python standard library's sources.

Questions: which of jaxnet's sequence models learns each task best and fastest on this CPU,
how much the result varies with the seed, and whether bits per character fall steadily as
the models grow.

* Sequential Fashion-MNIST: each image is a sequence of its 28 rows (28 pixels each); the
  recurrent models classify from their last state, the transformer from the mean of its
  tokens (``jaxnet train --model lstm|gru|transformer``). Target: the LSTM >= 89% test accuracy.
* Character LM: next-character prediction over windows of the standard library's ``.py``
  files (``jaxnet train --dataset text``), scored in bits per character on held-out windows,
  for three widths of each model.

The score is the test metric after the last epoch (``validation_split=0``: no epoch or model
is picked on the test set). Steps per second are wall time of the training epochs (the first,
which includes warm-up, left out) on a CPU that may be shared with other jobs.

Run from the repository root:

    python experiments/sequences.py              # full (see results.md for its cost)
    python experiments/sequences.py --quick      # 1 seed, 1 epoch, the smallest sizes

Each finished run is appended to ``runs.jsonl`` in the results directory at once, and a later
call with the same settings skips the runs already there: an interrupted experiment goes on
where it stopped (``--fresh`` starts over). Writes ``experiments/results/sequences/``:
``runs.jsonl``, ``results.json``, ``results.md``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from matplotlib.figure import Figure

import common
from jaxnet.app.run import RunConfig

MODELS = ("lstm", "gru", "transformer")
TARGETS = {"lstm": 0.89}  # sequential Fashion-MNIST test accuracy
COLORS = {"lstm": "tab:blue", "gru": "tab:orange", "transformer": "tab:green"}
# on Fashion-MNIST: the recurrent width, or d_model (the transformer's 2 blocks cost more per
# width: at 64 its step costs about what the recurrent models' steps cost at 128)
IMAGE_WIDTHS = {"lstm": 128, "gru": 128, "transformer": 64}


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = MODELS
    seeds: int = 2
    image_epochs: int = 12
    text_widths: tuple[int, ...] = (32, 96, 256)
    text_epochs: int = 3
    text_chars: int = 1_500_000
    text_seeds: int = 2
    out: str = "sequences"


def parse_settings() -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(defaults.models))
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--image-epochs", type=int, default=defaults.image_epochs)
    parser.add_argument("--text-widths", default=",".join(map(str, defaults.text_widths)))
    parser.add_argument("--text-epochs", type=int, default=defaults.text_epochs)
    parser.add_argument("--text-seeds", type=int, default=defaults.text_seeds)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, small sizes")
    parser.add_argument("--fresh", action="store_true", help="forget the runs of earlier calls")
    args = parser.parse_args()
    settings = Settings(models=tuple(args.models.split(",")), seeds=args.seeds,
                        image_epochs=args.image_epochs,
                        text_widths=tuple(int(w) for w in args.text_widths.split(",")),
                        text_epochs=args.text_epochs, text_seeds=args.text_seeds)
    if args.quick:
        settings = dataclasses.replace(settings, seeds=1, text_seeds=1, image_epochs=1, text_epochs=1,
                                       text_widths=(16, 32), text_chars=100_000, out="sequences/quick")
    if args.fresh:
        (common.RESULTS / settings.out / "runs.jsonl").unlink(missing_ok=True)
    return settings


def image_config(settings: Settings, model: str, seed: int) -> RunConfig:
    return RunConfig(dataset="fashion-mnist", model=model, hidden=(IMAGE_WIDTHS[model],),
                     layers=2 if model == "transformer" else 1, heads=4, optimizer="adamw",
                     weight_decay=1e-4, lr=2e-3, schedule="cosine", batch_size=128,
                     standardize=True, seed=seed, epochs=settings.image_epochs, validation_split=0)


def text_config(settings: Settings, model: str, width: int, seed: int) -> RunConfig:
    return RunConfig(dataset="text", model=model, hidden=(width,),
                     layers=2 if model == "transformer" else 1, heads=4, seq_len=128,
                     max_chars=settings.text_chars, optimizer="adamw", weight_decay=1e-4,
                     lr=2e-3, schedule="cosine", batch_size=32, seed=seed,
                     epochs=settings.text_epochs, validation_split=0)


def steps_per_second(record: dict) -> float:
    """Training steps per second, the first epoch left out when there are others."""
    config = record["config"]
    rates = record["examples_per_second"][1:] or record["examples_per_second"]
    return float(np.mean(rates)) / config["batch_size"]


def image_table(settings: Settings, records: list[dict]) -> str:
    header = ["model", "width", "params", "seeds", "epochs", "final test acc (%)", "final train acc (%)",
              "steps / s", "target", "met"]
    rows = []
    for model in settings.models:
        runs = [r for r in records if r["task"] == "image" and r["model"] == model]
        if not runs:
            continue
        final = [r["test_accuracy"][-1] for r in runs]
        target = TARGETS.get(model)
        rows.append([model, IMAGE_WIDTHS[model], f"{runs[0]['num_params']:,}", len(runs), len(runs[0]["test_accuracy"]),
                     common.format_mean_std(final),
                     common.format_mean_std([r["train_accuracy"][-1] for r in runs]),
                     f"{np.mean([steps_per_second(r) for r in runs]):.1f}",
                     f"{target:.0%}" if target else "-",
                     ("yes" if np.mean(final) >= target else "no") if target else "-"])
    return common.markdown_table(header, rows)


def text_table(settings: Settings, records: list[dict]) -> str:
    header = ["model", "width", "params", "seeds", "test bits/char", "train bits/char",
              "tokens / s"]
    rows = []
    for model in settings.models:
        for width in settings.text_widths:
            runs = [r for r in records if r["task"] == "text" and r["model"] == model
                    and r["width"] == width]
            if not runs:
                continue
            seq_len = runs[0]["config"]["seq_len"]
            rows.append([model, width, f"{runs[0]['num_params']:,}", len(runs),
                         common.format_mean_std([r["test_bits_per_char"][-1] for r in runs], 1, 3),
                         common.format_mean_std([r["train_bits_per_char"][-1] for r in runs], 1, 3),
                         f"{np.mean([steps_per_second(r) for r in runs]) * 32 * seq_len:,.0f}"])
    return common.markdown_table(header, rows)


def report(settings: Settings, records: list[dict]) -> str:
    return "\n".join([
        "Sequential Fashion-MNIST (rows as time steps): LSTM and GRU of width "
        f"{IMAGE_WIDTHS['lstm']}, transformer of d_model {IMAGE_WIDTHS['transformer']} (2 blocks, 4 "
        "heads), AdamW wd 1e-4, lr 2e-3 cosine to 0, batch 128, standardised inputs, "
        f"{settings.image_epochs} epochs. Score: test accuracy after the last epoch; mean ± "
        "sample std over seeds.\n", image_table(settings, records),
        f"\n\nCharacter LM on the Python standard library's sources ({settings.text_chars:,} "
        "characters, a tenth held out), windows of 128, batch 32, AdamW lr 2e-3 cosine, "
        f"{settings.text_epochs} epochs; width is the recurrent width or d_model (transformer: 2 "
        "blocks). Score: bits per character on the held-out windows after the last epoch.\n",
        text_table(settings, records)])


def plot(settings: Settings, records: list[dict], path) -> None:
    figure = Figure(figsize=(11, 4.5))
    image_ax, text_ax = figure.subplots(1, 2)
    for model in settings.models:
        color = COLORS.get(model)
        for i, r in enumerate(r for r in records if r["task"] == "image" and r["model"] == model):
            epochs = np.arange(1, len(r["test_accuracy"]) + 1)
            image_ax.plot(epochs, 100 * np.array(r["test_accuracy"]), color=color, marker=".",
                          label=f"{model} test" if i == 0 else None)
        runs = [r for r in records if r["task"] == "text" and r["model"] == model]
        sizes = sorted({r["num_params"] for r in runs})
        bpc = [np.mean([r["test_bits_per_char"][-1] for r in runs if r["num_params"] == n]) for n in sizes]
        if sizes:
            text_ax.plot(sizes, bpc, color=color, marker="o", label=model)
    for model, target in TARGETS.items():
        image_ax.axhline(100 * target, color=COLORS[model], ls="--", lw=0.8, label=f"{model} target")
    image_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Sequential Fashion-MNIST")
    text_ax.set(xscale="log", xlabel="parameters", ylabel="test bits per character",
                title="Character LM (stdlib sources)")
    text_ax.grid(alpha=0.3)
    text_ax.legend(fontsize=8)
    common.save_epoch_figure(figure, (image_ax,), path)


def earlier_runs(path) -> dict[str, dict]:
    """The records of runs finished by earlier calls, by their config (as JSON)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {json.dumps(r["config"], sort_keys=True): r for r in records}


def main() -> None:
    settings = parse_settings()
    started, header = time.time(), {"command": common.command(), "machine": common.machine()}
    runs_file = common.RESULTS / settings.out / "runs.jsonl"
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    done = earlier_runs(runs_file)
    runs = [("image", model, IMAGE_WIDTHS[model], seed, image_config(settings, model, seed))
            for model in settings.models for seed in range(settings.seeds)]
    runs += [("text", model, width, seed, text_config(settings, model, width, seed))
             for model in settings.models for width in settings.text_widths
             for seed in range(settings.text_seeds)]
    records = []
    for task, model, width, seed, config in runs:
        known = json.dumps(dataclasses.asdict(config), sort_keys=True)
        if known in done:
            records.append(done[known])
            continue
        record = common.train_record(config)
        record.update(task=task, model=model, width=width, seed=seed, commit=common.commit())
        records.append(record)
        with runs_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        score = (f"test acc {record['test_accuracy'][-1]:.4f}" if task == "image"
                 else f"test bpc {record['test_bits_per_char'][-1]:.3f}")
        print(f"{task} {model} width {width} seed {seed}: {score}, "
              f"{steps_per_second(record):.1f} steps/s, {record['wall_seconds']:.0f} s", flush=True)
    common.finish(settings, records, report(settings, records), plot, started, header)


if __name__ == "__main__":
    main()
