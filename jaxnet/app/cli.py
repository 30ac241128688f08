"""The ``jaxnet`` command: ``train``, ``eval``, ``predict``, ``summary``, ``bench``.

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
    from jaxnet.app.run import RunConfig

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


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _add_model_options(parser: argparse.ArgumentParser, defaults, drop_rate: bool = True) -> None:
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
    if drop_rate:
        _add_config_option(parser, "--drop-rate", defaults.drop_rate, type=float)


def _parser() -> argparse.ArgumentParser:
    from jaxnet.precision import TRAINING_PRECISIONS
    from jaxnet.app.run import OPTIMIZERS, SCHEDULES, RunConfig
    from jaxnet.train import ON_NAN

    defaults = RunConfig()
    parser = _Parser(prog="jaxnet", description="Train and evaluate jaxnet networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a network and write a run directory")
    _add_model_options(train, defaults)
    _add_config_option(train, "--init-scale", defaults.init_scale,
                       "factor on every initial parameter", type=float)
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
    _add_config_option(train, "--precision", defaults.precision,
                       "bf16: float32 params and loss, bfloat16 forward pass", choices=TRAINING_PRECISIONS)
    _add_config_option(train, "--devices", "all local devices",
                       "train data-parallel on N devices of each process", type=int, metavar="N")
    cluster = train.add_argument_group(
        "several processes", "one process per host, see docs/scaling.md; the flags may also come "
        "from JAXNET_COORDINATOR, JAXNET_NUM_PROCESSES, JAXNET_PROCESS_ID")
    cluster.add_argument("--coordinator", metavar="HOST:PORT",
                         help="address of process 0, the same for every process")
    cluster.add_argument("--num-processes", type=int, metavar="N")
    cluster.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
    train.add_argument("--out", type=Path, help="run directory (default runs/DATASET-MODEL-TIME)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue RUN_DIR, killed or stopped, from its latest checkpoint with "
                            "its own config.json (takes no other training options)")
    train.add_argument("--no-progress", dest="progress", action="store_false")

    evaluate = commands.add_parser("eval", help="test metrics and confusion matrix of a run")
    evaluate.add_argument("run_dir", type=Path)

    predict = commands.add_parser(
        "predict", help="a run's outputs for the inputs in a .npy file, written to a .npy file",
        description="Inputs are raw, as the data set's loader reads them (uint8: pixels 0..255; "
                    "floats: as jaxnet.data gives them, e.g. in [0, 1]), shaped (n, *example), "
                    "(n, *example without a channel axis of 1) or (n, features); the run's "
                    "standardisation is applied. Memory-mapped: any number of inputs.")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("--input", type=Path, required=True, metavar="X.npy")
    predict.add_argument("--output", type=Path, required=True, metavar="P.npy",
                         help="(n, classes) float32; written only when complete")
    predict.add_argument("--proba", action="store_true",
                         help="write probabilities (softmax) instead of logits")
    predict.add_argument("--batch-size", type=int, default=8192, help="inputs per compiled call")
    predict.add_argument("--no-progress", dest="progress", action="store_false")

    sweep = commands.add_parser(
        "sweep", help="train a grid of seeds and hyperparameters at once, as one population",
        description="Every combination of the listed values, each with --seeds seeds, trains in "
                    "one compiled program; results.md, results.json, curves.png and the best "
                    "member's run directory (best/) go to --out.")
    _add_model_options(sweep, defaults, drop_rate=False)
    sweep.add_argument("--seeds", type=int, default=8, metavar="N",
                       help="seeds per setting: --seed, --seed + 1, ... (default: 8)")
    for flag, name in (("--lr", "lr"), ("--weight-decay", "weight_decay"),
                       ("--drop-rate", "drop_rate"), ("--init-scale", "init_scale")):
        sweep.add_argument(flag, dest=f"grid_{name}", type=_float_list, metavar="A,B,...",
                           help=f"values to try (default: {getattr(defaults, name)})")
    for flag in ("--epochs", "--batch-size", "--seed"):
        _add_config_option(sweep, flag, getattr(defaults, flag[2:].replace("-", "_")), type=int)
    _add_config_option(sweep, "--optimizer", defaults.optimizer, choices=OPTIMIZERS)
    _add_config_option(sweep, "--schedule", defaults.schedule, choices=SCHEDULES)
    _add_config_option(sweep, "--precision", defaults.precision, choices=TRAINING_PRECISIONS)
    sweep.add_argument("--no-standardize", dest="standardize", action="store_false", default=None)
    sweep.add_argument("--shared-order", action="store_true",
                       help="every member sees the same batches (faster); by default each "
                            "shuffles with its own seed, as jaxnet train does")
    sweep.add_argument("--out", type=Path, help="sweep directory (default runs/sweep-DATASET-TIME)")
    sweep.add_argument("--no-progress", dest="progress", action="store_false")

    summary = commands.add_parser("summary", help="the model table (of a run, or from options)")
    summary.add_argument("run_dir", type=Path, nargs="?")
    _add_model_options(summary, defaults)

    bench = commands.add_parser("bench", help="jaxnet against hand-written raw JAX, side by side")
    bench.add_argument("--json", type=Path, help="also write the results to this JSON file")
    bench.add_argument("--quick", action="store_true", help="fewer rounds and steps (~1 minute)")
    return parser


def _config_from(args) -> "RunConfig":
    from jaxnet.app.run import RunConfig

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
    from jaxnet.app.run import RunConfig

    names = [f.name for f in dataclasses.fields(RunConfig) if getattr(args, f.name, None) is not None]
    return (["--out"] if args.out is not None else []) + [
        "--no-standardize" if n == "standardize" else "--" + n.replace("_", "-") for n in names]


def cmd_train(args, console: Console) -> None:
    from jaxnet import data_parallel
    from jaxnet.app.run import read_config, train

    # Before anything starts JAX's backends; a no-op without cluster flags or variables.
    data_parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    main_process = data_parallel.is_main_process()  # the one that writes and reports
    if args.resume is not None:
        if given := _given_options(args):
            raise UsageError(f"--resume continues {args.resume} with its own config.json; it takes "
                             f"no other training options (got {', '.join(given)})")
        out, (config, _) = args.resume, read_config(args.resume)
    else:
        config = _config_from(args)
        out = _new_run_dir(args, config) if main_process else None
    start = time.perf_counter()
    _, history, _, dataset = train(config, out, progress=args.progress,
                                   resume=args.resume is not None)
    if not main_process:
        return
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
    from jaxnet.app.run import load_data, read_run

    config, record, net, params = read_run(args.run_dir)
    dataset, _ = load_data(config)
    labels = jnp.asarray(dataset.y_test)
    logits = jnp.asarray(predict(net, params, dataset.x_test,  # one pass, in fixed-size chunks
                                 precision=config.precision))
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


def cmd_predict(args, console: Console) -> None:
    from jaxnet.data import open_npy
    from jaxnet.inference import predict_to_file
    from jaxnet.app.run import read_run, run_preprocess

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: directory {args.output.parent} does not exist")
    config, record, net, params = read_run(args.run_dir)
    x = open_npy(args.input)
    try:
        preprocess = run_preprocess(record["data"], x.shape, x.dtype)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--input {args.input}: {error}") from None
    start = time.perf_counter()
    predict_to_file(net, params, x, args.output, batch_size=args.batch_size, proba=args.proba,
                    progress=args.progress, preprocess=preprocess, precision=config.precision)
    what = "probabilities" if args.proba else "logits"
    console.print(f"{args.output}: {what} of shape ({len(x)}, {record['data']['num_classes']}) "
                  f"for {args.input} ({time.perf_counter() - start:.1f} s)", highlight=False)


def cmd_sweep(args, console: Console) -> None:
    from jaxnet.app.sweep import GRID, format_settings, sweep, sweep_configs

    base = _config_from(args)
    grid = {name: getattr(args, f"grid_{name}") for name in GRID
            if getattr(args, f"grid_{name}") is not None}
    out = args.out or Path("runs") / f"sweep-{base.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "sweep.json").exists():
        raise UsageError(f"{out} already holds a sweep; choose another --out")
    sweep_configs(base, args.seeds, grid)  # bad values fail here, before any file is written
    results = sweep(base, args.seeds, grid, out, shared_order=args.shared_order,
                    progress=args.progress)
    rows = format_settings(results, tuple(grid) or ("lr",))  # the hyperparameters swept
    table = Table(title=f"{len(results['members'])} members, {base.epochs} epochs, "
                        f"{results['seconds']:.1f} s")
    for header in rows[0]:
        table.add_column(header, justify="right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    best, ensemble = results["best"], results["ensemble"]
    console.print(f"best member {best['member']} (seed {best['seed']}, lr {best['lr']:g}): test "
                  f"accuracy [bold green]{best['test_accuracy']:.2%}[/bold green]; ensemble of "
                  f"{ensemble['members']}: {ensemble['test_accuracy']:.2%}")
    console.print(f"results: {out}/ (results.md, results.json, metrics.jsonl, curves.png, best/)")


def cmd_summary(args, console: Console) -> None:
    from jaxnet.app.run import build_model, load_data, read_run
    from jaxnet.nn.summary import summarize

    if args.run_dir is not None:
        _, record, net, _ = read_run(args.run_dir)
        example_shape = tuple(record["data"]["example_shape"])
    else:
        config = _config_from(args)
        dataset, _ = load_data(config)
        net, example_shape = build_model(config, dataset.num_classes), dataset.x_train.shape[1:]
    console.print(str(summarize(net, (1,) + example_shape)), highlight=False)


def cmd_bench(args, console: Console) -> None:
    from benchmarks.harness import format_table, run_benchmarks, write_json

    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: directory {args.json.parent} does not exist")
    # as written: no markup (notes say "pip install -e '.[peers]'"), table rows not wrapped
    plain = dict(highlight=False, markup=False, soft_wrap=True)
    results = run_benchmarks(quick=args.quick, log=lambda line: console.print(line, **plain))
    console.print(format_table(results), **plain)
    if args.json is not None:
        write_json(results, args.json)
        console.print(f"results: {args.json}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "sweep": cmd_sweep,
            "summary": cmd_summary, "bench": cmd_bench}


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
