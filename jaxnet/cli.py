"""The ``jaxnet`` command: ``train``, ``eval``, ``summary``, ``bench``.

Bad arguments or data give one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from jaxnet.run import RunConfig

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


def _add_config_option(parser: argparse.ArgumentParser, flag: str, default, help: str = "",
                       **kwargs) -> None:
    """A RunConfig option. It parses as None when not given (``_config_from`` fills in the
    default), so that ``train --resume`` can refuse options it would otherwise ignore."""
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    parser.add_argument(flag, default=None, help=f"{help} (default: {shown})".lstrip(), **kwargs)


def _add_model_options(parser: argparse.ArgumentParser, defaults) -> None:
    _add_config_option(parser, "--dataset", defaults.dataset,
                       choices=("digits", "fashion-mnist", "mnist", "npz"))
    parser.add_argument("--data-dir", help="directory of MNIST-format IDX files")
    parser.add_argument("--data", help="the .npz file for --dataset npz "
                                       "(arrays x_train, y_train, x_test, y_test)")
    _add_config_option(parser, "--model", defaults.model, choices=("mlp", "cnn"))
    _add_config_option(parser, "--hidden", defaults.hidden, "hidden widths of the MLP, e.g. 512,512",
                       type=_int_list)
    _add_config_option(parser, "--activation", defaults.activation,
                       choices=("relu", "sigmoid", "tanh", "gelu", "silu", "elu"))
    _add_config_option(parser, "--drop-rate", defaults.drop_rate, type=float)


def _parser() -> argparse.ArgumentParser:
    from jaxnet.run import OPTIMIZERS, SCHEDULES, RunConfig
    from jaxnet.train import ON_NAN

    defaults = RunConfig()
    parser = _Parser(prog="jaxnet", description="Train and evaluate jaxnet networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a network and write a run directory")
    _add_model_options(train, defaults)
    _add_config_option(train, "--epochs", defaults.epochs, type=int)
    _add_config_option(train, "--batch-size", defaults.batch_size, type=int)
    _add_config_option(train, "--lr", defaults.lr, type=float)
    _add_config_option(train, "--optimizer", defaults.optimizer, choices=OPTIMIZERS)
    _add_config_option(train, "--weight-decay", defaults.weight_decay, type=float)
    _add_config_option(train, "--schedule", defaults.schedule, choices=SCHEDULES)
    _add_config_option(train, "--seed", defaults.seed, type=int)
    train.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                       help="feed raw [0, 1] pixels instead of standardised inputs")
    _add_config_option(train, "--checkpoint-every", defaults.checkpoint_every,
                       "save the whole training state every N epochs in OUT/checkpoints; 0: never",
                       type=int, metavar="N")
    _add_config_option(train, "--keep-checkpoints", defaults.keep_checkpoints,
                       "how many of the newest checkpoints to keep", type=int, metavar="K")
    _add_config_option(train, "--on-nan", defaults.on_nan,
                       "on a NaN or infinite loss: stop, or skip the batch's update", choices=ON_NAN)
    train.add_argument("--out", type=Path, help="run directory (default runs/DATASET-MODEL-TIME)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue RUN_DIR, killed or stopped, from its latest checkpoint with "
                            "its own config.json (takes no other training options)")
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


def _given_options(args) -> list[str]:
    """The RunConfig options (and --out) given on the command line."""
    from jaxnet.run import RunConfig

    names = [f.name for f in dataclasses.fields(RunConfig) if getattr(args, f.name, None) is not None]
    return (["--out"] if args.out is not None else []) + [
        "--no-standardize" if n == "standardize" else "--" + n.replace("_", "-") for n in names]


def cmd_train(args, console: Console) -> None:
    from jaxnet.run import read_config, train

    if args.resume is not None:
        if given := _given_options(args):
            raise UsageError(f"--resume continues {args.resume} with its own config.json; it takes "
                             f"no other training options (got {', '.join(given)})")
        out, (config, _) = args.resume, read_config(args.resume)
    else:
        config = _config_from(args)
        out = _new_run_dir(args, config)
    start = time.perf_counter()
    _, history, _, dataset = train(config, out, progress=args.progress,
                                   resume=args.resume is not None)
    last = history[-1]
    console.print(
        f"[bold]{config.model}[/bold] on [bold]{dataset.name}[/bold]: test accuracy "
        f"[bold green]{last['test_accuracy']:.2%}[/bold green], test loss {last['test_loss']:.4f} "
        f"after {config.epochs} epochs ({time.perf_counter() - start:.1f} s, compile "
        f"{history[0]['compile_seconds']:.1f} s)")
    files = "config.json, metrics.jsonl, params.safetensors, curves.png"
    console.print(f"results: {out}/ ({files}{', checkpoints/' if config.checkpoint_every else ''})")


def cmd_eval(args, console: Console) -> None:
    import jax.numpy as jnp

    from jaxnet.inference import predict
    from jaxnet.losses import softmax_cross_entropy
    from jaxnet.metrics import accuracy, confusion_matrix
    from jaxnet.run import load_data, read_run

    config, record, net, params = read_run(args.run_dir)
    dataset, _ = load_data(config)
    labels = jnp.asarray(dataset.y_test)
    logits = jnp.asarray(predict(net, params, dataset.x_test))  # one pass, in fixed-size chunks
    loss = float(softmax_cross_entropy(logits, labels).mean())
    console.print(f"{args.run_dir}: {config.model} on {dataset.name}, {len(dataset.x_test)} test "
                  f"examples: accuracy {float(accuracy(logits, labels)):.2%}, loss {loss:.4f}")
    matrix = confusion_matrix(jnp.argmax(logits, axis=-1), labels, dataset.num_classes)
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
