"""The ``jaxnet`` command: ``train``, ``eval``, ``summary``, ``bench``.

Bad arguments or data give one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

USAGE_ERROR = 2


class UsageError(Exception):
    """A bad command line; reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UsageError(f"{self.prog}: {message}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def _add_model_options(parser: argparse.ArgumentParser, defaults) -> None:
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist", "mnist", "npz"),
                        default=defaults.dataset)
    parser.add_argument("--data-dir", help="directory of MNIST-format IDX files")
    parser.add_argument("--data", help="the .npz file for --dataset npz "
                                       "(arrays x_train, y_train, x_test, y_test)")
    parser.add_argument("--model", choices=("mlp", "cnn"), default=defaults.model)
    parser.add_argument("--hidden", type=_int_list, default=defaults.hidden,
                        help="hidden widths of the MLP, e.g. 512,512 (default %(default)s)")
    parser.add_argument("--activation", choices=("relu", "sigmoid", "tanh", "gelu", "silu", "elu"),
                        default=defaults.activation)
    parser.add_argument("--drop-rate", type=float, default=defaults.drop_rate)


def _parser() -> argparse.ArgumentParser:
    from jaxnet.run import OPTIMIZERS, SCHEDULES, RunConfig

    defaults = RunConfig()
    parser = _Parser(prog="jaxnet", description="Train and evaluate jaxnet networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a network and write a run directory")
    _add_model_options(train, defaults)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--no-standardize", dest="standardize", action="store_false",
                       help="feed raw [0, 1] pixels instead of standardised inputs")
    train.add_argument("--out", type=Path, help="run directory (default runs/DATASET-MODEL-TIME)")
    train.add_argument("--no-progress", dest="progress", action="store_false")

    evaluate = commands.add_parser("eval", help="test metrics and confusion matrix of a run")
    evaluate.add_argument("run_dir", type=Path)

    summary = commands.add_parser("summary", help="the model table (of a run, or from options)")
    summary.add_argument("run_dir", type=Path, nargs="?")
    _add_model_options(summary, defaults)

    bench = commands.add_parser("bench", help="jaxnet against hand-written raw JAX, side by side")
    bench.add_argument("--json", type=Path, help="also write the results to this JSON file")
    bench.add_argument("--quick", action="store_true", help="fewer rounds and steps (~1 minute)")
    return parser


def _config_from(args) -> "RunConfig":
    from jaxnet.run import RunConfig

    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _new_run_dir(args, config) -> Path:
    out = args.out or Path("runs") / f"{config.dataset}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "config.json").exists():
        raise UsageError(f"{out} already holds a run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_train(args, console: Console) -> None:
    from jaxnet.run import train

    config = _config_from(args)
    out = _new_run_dir(args, config)
    start = time.perf_counter()
    _, history, _, dataset = train(config, out, progress=args.progress)
    last = history[-1]
    console.print(
        f"[bold]{config.model}[/bold] on [bold]{dataset.name}[/bold]: test accuracy "
        f"[bold green]{last['test_accuracy']:.2%}[/bold green], test loss {last['test_loss']:.4f} "
        f"after {config.epochs} epochs ({time.perf_counter() - start:.1f} s, compile "
        f"{history[0]['compile_seconds']:.1f} s)")
    console.print(f"results: {out}/ (config.json, metrics.jsonl, params.safetensors, curves.png)")


def cmd_eval(args, console: Console) -> None:
    import jax.numpy as jnp

    from jaxnet.metrics import confusion_matrix
    from jaxnet.run import load_data, read_run
    from jaxnet.train import evaluate

    config, record, net, params = read_run(args.run_dir)
    dataset, _ = load_data(config)
    metrics = evaluate(net, params, (dataset.x_test, dataset.y_test))
    console.print(f"{args.run_dir}: {config.model} on {dataset.name}, {len(dataset.x_test)} test "
                  f"examples: accuracy {metrics['accuracy']:.2%}, loss {metrics['loss']:.4f}")
    predictions = jnp.argmax(net.apply(params, dataset.x_test), axis=-1)
    matrix = confusion_matrix(predictions, jnp.asarray(dataset.y_test), dataset.num_classes)
    table = Table(title="confusion matrix (rows: true class, columns: predicted)")
    table.add_column("")
    for c in range(dataset.num_classes):
        table.add_column(str(c), justify="right")
    for c, row in enumerate(matrix.tolist()):
        table.add_row(str(c), *map(str, row))
    console.print(table)


def cmd_summary(args, console: Console) -> None:
    from jaxnet.run import build_model, load_data, read_run
    from jaxnet.summary import summarize

    if args.run_dir is not None:
        _, record, net, _ = read_run(args.run_dir)
        example_shape = tuple(record["data"]["example_shape"])
    else:
        config = _config_from(args)
        dataset, _ = load_data(config)
        net, example_shape = build_model(config, dataset.num_classes), dataset.x_train.shape[1:]
    console.print(str(summarize(net, (1,) + example_shape)), highlight=False)


def cmd_bench(args, console: Console) -> None:
    from jaxnet.bench import format_table, run_benchmarks, write_json

    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: directory {args.json.parent} does not exist")
    results = run_benchmarks(quick=args.quick, log=lambda line: console.print(line, highlight=False))
    console.print(format_table(results), highlight=False)
    if args.json is not None:
        write_json(results, args.json)
        console.print(f"results: {args.json}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "summary": cmd_summary, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxnet`` command; returns the exit status."""
    from jaxnet.data import DataError

    console = Console()
    try:
        args = _parser().parse_args(argv)
        COMMANDS[args.command](args, console)
    except (UsageError, DataError, ValueError, TypeError, OSError, FloatingPointError) as error:
        message = " ".join(str(error).split())
        print(f"jaxnet: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("jaxnet: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
