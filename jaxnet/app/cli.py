"""The ``jaxnet`` command: ``train``, ``eval``, ``predict``, ``export``, ``generate``, ``sweep``,
``summary``.

(Benchmarks are not part of the package; they run with ``python benchmarks/run.py``.)

Bad arguments or data give one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from jaxnet.app.export_cmd import add_parser as add_export_parser, cmd_export

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


_HELP = {  # options that several commands share
    "epochs": "passes over the training set",
    "batch_size": "examples per training step",
    "lr": "learning rate (the peak, with the cosine schedule)",
    "optimizer": "the optax optimizer (momentum: SGD with momentum 0.9)",
    "weight_decay": "weight decay (decoupled for adamw, added to the gradient otherwise)",
    "schedule": "cosine: the learning rate decays to 0 over the run",
    "seed": "seed of the initial parameters, the shuffling and dropout",
    "standardize": "feed raw inputs (pixels in [0, 1]) instead of standardised ones",
    "precision": "bf16: bfloat16 operands in matrix products, everything else float32; "
                 "bf16-full: the whole forward pass in bfloat16",
    "progress": "no progress bar (nor, when stderr is not a terminal, one line per epoch)",
    "validation_split": "fraction of the training set held out (a fixed choice of rows) to "
                        "choose the epoch (train) or member (sweep) on; the test set measures "
                        "only the chosen one. 0: none, the last epoch is kept",
}


def _add_model_options(parser: argparse.ArgumentParser, defaults, drop_rate: bool = True) -> None:
    from jaxnet.runs import MODELS

    _add_config_option(parser, "--dataset", defaults.dataset,
                       "the data set (npz: your own, see --data; text: a character-level "
                       "language model over the text files in --data-dir)",
                       choices=("digits", "fashion-mnist", "mnist", "npz", "text"))
    parser.add_argument("--data-dir", metavar="DIR",
                        help="directory of MNIST-format IDX files; for --dataset text, of text "
                             "files (default: the Python standard library's .py files)")
    parser.add_argument("--data", metavar="FILE.npz", help="the .npz file for --dataset npz "
                                       "(arrays x_train, y_train, x_test, y_test)")
    _add_config_option(parser, "--model", defaults.model,
                       "mlp: dense layers (--hidden); cnn: two convolutions and a dense layer; "
                       "lstm, gru, transformer: sequence models (images: rows as time steps)",
                       choices=MODELS)
    _add_config_option(parser, "--hidden", defaults.hidden,
                       "hidden widths of the MLP, e.g. 512,512; lstm/gru/transformer: the first "
                       "is the recurrent width or the transformer's d_model",
                       type=_int_list, metavar="W,W,...")
    _add_config_option(parser, "--layers", "1 for lstm/gru, 2 for transformer",
                       "recurrent layers or transformer blocks", type=int, metavar="N")
    _add_config_option(parser, "--heads", defaults.heads, "attention heads of the transformer",
                       type=int, metavar="N")
    _add_config_option(parser, "--seq-len", defaults.seq_len,
                       "--dataset text: characters per training window", type=int, metavar="N")
    _add_config_option(parser, "--max-chars", defaults.max_chars,
                       "--dataset text: characters read from the files, at most (a tenth for "
                       "testing)", type=int, metavar="N")
    _add_config_option(parser, "--activation", defaults.activation,
                       "the hidden layers' activation",
                       choices=("relu", "sigmoid", "tanh", "gelu", "silu", "elu"))
    if drop_rate:
        _add_config_option(parser, "--drop-rate", defaults.drop_rate,
                           "dropout rate (MLP: after each hidden layer; CNN: before each dense "
                           "layer)", type=float, metavar="P")


def _add_task_option(parser: argparse.ArgumentParser, defaults) -> None:
    from jaxnet.data import TASKS

    _add_config_option(parser, "--task", defaults.task,
                       "what --data FILE.npz's y arrays hold: integer class labels, or numeric "
                       "regression targets (n,) or (n, outputs), trained with the mean squared "
                       "error", choices=TASKS)


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxnet`` command line: one subparser per command."""
    from jaxnet.precision import TRAINING_PRECISIONS
    from jaxnet.app.run import OPTIMIZERS, SCHEDULES, RunConfig
    from jaxnet.train import ON_NAN

    defaults = RunConfig()
    parser = _Parser(prog="jaxnet", description="Train and evaluate jaxnet networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="COMMAND", help="what to do")

    train = commands.add_parser("train", help="train a network and write a run directory")
    _add_model_options(train, defaults)
    _add_task_option(train, defaults)
    _add_config_option(train, "--init-scale", defaults.init_scale,
                       "factor on every initial parameter", type=float, metavar="S")
    _add_config_option(train, "--epochs", defaults.epochs, _HELP["epochs"], type=int, metavar="N")
    _add_config_option(train, "--batch-size", defaults.batch_size, _HELP["batch_size"], type=int,
                       metavar="N")
    _add_config_option(train, "--lr", defaults.lr, _HELP["lr"], type=float, metavar="LR")
    _add_config_option(train, "--optimizer", defaults.optimizer, _HELP["optimizer"],
                       choices=OPTIMIZERS)
    _add_config_option(train, "--weight-decay", defaults.weight_decay, _HELP["weight_decay"],
                       type=float, metavar="W")
    _add_config_option(train, "--schedule", defaults.schedule, _HELP["schedule"],
                       choices=SCHEDULES)
    _add_config_option(train, "--seed", defaults.seed, _HELP["seed"], type=int, metavar="S")
    train.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                       help=_HELP["standardize"])
    _add_config_option(train, "--checkpoint-every", defaults.checkpoint_every,
                       "save the whole training state every N epochs in OUT/checkpoints; 0: never",
                       type=int, metavar="N")
    _add_config_option(train, "--keep-checkpoints", defaults.keep_checkpoints,
                       "how many of the newest checkpoints to keep", type=int, metavar="K")
    _add_config_option(train, "--on-nan", defaults.on_nan,
                       "on a NaN or infinite loss: stop, or skip the batch's update", choices=ON_NAN)
    _add_config_option(train, "--precision", defaults.precision, _HELP["precision"],
                       choices=TRAINING_PRECISIONS)
    _add_config_option(train, "--devices", "all local devices",
                       "train data-parallel on N devices of each process", type=int, metavar="N")
    _add_config_option(train, "--mesh", "data over all devices",
                       "train on a data x fsdp x model mesh, e.g. data=2,fsdp=4: params and "
                       "optimizer state sharded over fsdp and model (docs/scaling.md)",
                       metavar="AXIS=N,...")
    _add_config_option(train, "--validation-split", defaults.validation_split,
                       _HELP["validation_split"], type=float, metavar="F")
    _add_config_option(train, "--patience", defaults.patience,
                       "stop after N epochs without a lower validation loss; 0: never",
                       type=int, metavar="N")
    cluster = train.add_argument_group(
        "several processes", "one process per host, see docs/scaling.md; the flags may also come "
        "from JAXNET_COORDINATOR, JAXNET_NUM_PROCESSES, JAXNET_PROCESS_ID")
    cluster.add_argument("--coordinator", metavar="HOST:PORT",
                         help="address of process 0, the same for every process")
    cluster.add_argument("--num-processes", type=int, metavar="N",
                         help="number of processes, the same for every process")
    cluster.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
    train.add_argument("--out", type=Path, metavar="DIR",
                       help="run directory (default runs/DATASET-MODEL-TIME); it must be "
                            "missing or empty")
    train.add_argument("--force", action="store_true",
                       help="replace the run already in --out (only its known files are removed)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue RUN_DIR, killed or stopped, from its latest checkpoint with "
                            "its own config.json (takes no other training options)")
    train.add_argument("--no-progress", dest="progress", action="store_false",
                       help=_HELP["progress"])

    evaluate = commands.add_parser("eval", help="test metrics and confusion matrix of a run")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                          help="a finished run directory (from jaxnet train)")

    predict = commands.add_parser(
        "predict", help="a run's outputs for the inputs in a .npy file, written to a .npy file",
        description="Inputs are raw, as the data set's loader reads them (uint8: pixels 0..255; "
                    "floats: as jaxnet.data gives them, e.g. in [0, 1]), shaped (n, *example), "
                    "(n, *example without a channel axis of 1) or (n, features); the run's "
                    "standardisation is applied. Memory-mapped: any number of inputs.")
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="a finished run directory (from jaxnet train)")
    predict.add_argument("--input", type=Path, required=True, metavar="X.npy",
                         help="the inputs, a .npy file (memory-mapped)")
    predict.add_argument("--output", type=Path, required=True, metavar="P.npy",
                         help="(n, classes) float32 (a regression run: (n, outputs)); "
                              "written only when complete")
    predict.add_argument("--proba", action="store_true",
                         help="write probabilities (softmax) instead of logits")
    predict.add_argument("--batch-size", type=int, default=8192, metavar="N",
                         help="inputs per compiled call (default: 8192)")
    predict.add_argument("--no-progress", dest="progress", action="store_false",
                         help="no progress bar")

    add_export_parser(commands)

    generate = commands.add_parser(
        "generate", help="sample text from a language model run (--dataset text)",
        description="Samples characters one at a time after the prompt and prints the prompt "
                    "and the sample.")
    generate.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                          help="a finished run directory of jaxnet train --dataset text")
    generate.add_argument("--prompt", required=True, metavar="TEXT",
                          help="the text to continue (characters of the run's vocabulary)")
    generate.add_argument("--length", type=int, default=200, metavar="N",
                          help="characters to sample (default: 200)")
    generate.add_argument("--temperature", type=float, default=0.8, metavar="T",
                          help="divides the logits; 0 takes the most likely character (default: 0.8)")
    generate.add_argument("--seed", type=int, default=0, metavar="S",
                          help="seed of the sampling (default: 0)")

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
                           help=f"{flag[2:]} values to try (default: {getattr(defaults, name)})")
    for flag, metavar in (("--epochs", "N"), ("--batch-size", "N"), ("--seed", "S")):
        name = flag[2:].replace("-", "_")
        _add_config_option(sweep, flag, getattr(defaults, name), _HELP[name], type=int,
                           metavar=metavar)
    _add_config_option(sweep, "--optimizer", defaults.optimizer, _HELP["optimizer"],
                       choices=OPTIMIZERS)
    _add_config_option(sweep, "--schedule", defaults.schedule, _HELP["schedule"],
                       choices=SCHEDULES)
    _add_config_option(sweep, "--precision", defaults.precision, _HELP["precision"],
                       choices=TRAINING_PRECISIONS)
    _add_config_option(sweep, "--validation-split", defaults.validation_split,
                       _HELP["validation_split"] + " (a sweep needs one)", type=float, metavar="F")
    sweep.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                       help=_HELP["standardize"])
    sweep.add_argument("--shared-order", action="store_true",
                       help="every member sees the same batches (faster); by default each "
                            "shuffles with its own seed, as jaxnet train does")
    sweep.add_argument("--out", type=Path, metavar="DIR",
                       help="sweep directory (default runs/sweep-DATASET-TIME); it must be "
                            "missing or empty")
    sweep.add_argument("--force", action="store_true",
                       help="replace the sweep already in --out (only its known files are removed)")
    sweep.add_argument("--no-progress", dest="progress", action="store_false",
                       help=_HELP["progress"])

    summary = commands.add_parser("summary", help="the model table (of a run, or from options)")
    summary.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR",
                         help="a run directory; without it, the model the options describe")
    _add_model_options(summary, defaults)
    _add_task_option(summary, defaults)

    return parser


def _config_from(args) -> "RunConfig":
    from jaxnet.app.run import RunConfig

    names = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "data" in values and "dataset" not in values:  # --data FILE.npz says --dataset npz
        values["dataset"] = "npz"
    return RunConfig(**values)


def _shard_dir(args, config) -> Path | None:
    """Where a process other than the main one writes: nothing (``None``), or, when the run
    shards params over several processes, its shards of each checkpoint into ``--out``."""
    from jaxnet.app.run import shards_params
    if not shards_params(config):
        return None
    if args.out is None:
        raise UsageError(f"--mesh {config.mesh} shards the params over the processes: give every "
                         "process the same --out, a directory all of them reach (each saves its "
                         "shards of the checkpoints there)")
    return args.out


def _new_run_dir(args, config) -> Path:
    """The run directory to write; ``train`` creates it once the data and model are ready."""
    out = args.out or Path("runs") / f"{config.dataset}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    return out


class _RemovedIfUnused:
    """On failure before results are written, removes what a command made: the files it writes
    first (``start_files``, ``metrics.jsonl`` still empty) and the directories it created
    (``out`` and any missing parents); a directory that was there before stays."""

    def __init__(self, out: Path | None, start_files: tuple[str, ...]):
        self.out, self.start_files = out, start_files
        self.created = [] if out is None else [p for p in (out, *out.parents) if not p.exists()]
        self.before = set() if out is None or not out.is_dir() else set(out.iterdir())

    def rebase(self) -> None:
        """Takes what ``out`` holds now as there before (once the lock is held and an old run
        removed); a ``.lock`` this command made stays new."""
        from jaxnet.app.rundir import LOCK_FILE

        lock = self.out / LOCK_FILE
        had_lock = lock in self.before
        self.before = set(self.out.iterdir())
        if not had_lock:
            self.before.discard(lock)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        stopped = kind is None or issubclass(kind, (KeyboardInterrupt, FloatingPointError))
        if stopped or self.out is None:
            return False  # stopped by hand or diverged in training: kept (to resume, to inspect)
        if self.out.is_dir():
            new = set(self.out.iterdir()) - self.before
            if any(p.name not in self.start_files or not p.is_file() or
                   (p.name == "metrics.jsonl" and p.stat().st_size) for p in new):
                return False  # results were written: kept for inspection
            for p in new:
                p.unlink()
        for directory in self.created:  # out first, then the parents this command made
            try:
                directory.rmdir()
            except OSError:  # missing, or not empty (another process wrote there)
                break
        return False


def _given_options(args) -> list[str]:
    """The RunConfig options (and --out) given on the command line."""
    from jaxnet.app.run import RunConfig

    names = [f.name for f in dataclasses.fields(RunConfig) if getattr(args, f.name, None) is not None]
    return (["--out"] if args.out is not None else []) + [
        "--no-standardize" if n == "standardize" else "--" + n.replace("_", "-") for n in names]


def cmd_train(args, console: Console) -> None:
    from jaxnet import data_parallel
    from jaxnet.app.run import chosen_record, read_config, train
    from jaxnet.app.rundir import LOCK_FILE, RUN_FILES, RunLock, prepare_new, remove_leftovers
    from jaxnet.run_manifest import MANIFEST_FILE

    # Before anything starts JAX's backends; a no-op without cluster flags or variables.
    data_parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    main_process = data_parallel.is_main_process()  # the one that writes and reports
    if args.resume is not None:
        if given := _given_options(args) + (["--force"] if args.force else []):
            raise UsageError(f"--resume continues {args.resume} with its own config.json; it takes "
                             f"no other training options (got {', '.join(given)})")
        out, (config, _) = args.resume, read_config(args.resume)
    else:
        config = _config_from(args)
        out = _new_run_dir(args, config) if main_process else _shard_dir(args, config)
    start = time.perf_counter()
    guard = _RemovedIfUnused(None if args.resume is not None or not main_process else out,
                             ("config.json", "metrics.jsonl", MANIFEST_FILE, LOCK_FILE))
    # Only the process that writes locks; held until the run ends (the OS drops it on a kill).
    # On a refusal, the guard removes the .lock and directories this command made.
    with RunLock(out) if out is not None and main_process else contextlib.nullcontext(), guard:
        if out is not None and main_process:
            if args.resume is None:
                prepare_new(out, "run", args.force)
                guard.rebase()
            remove_leftovers(out, RUN_FILES)
        _, history, _, dataset = train(config, out, progress=args.progress,
                                       resume=args.resume is not None)
    if not main_process:
        return
    last, epochs = chosen_record(history), history[-1]["epoch"]
    timing = (f"after {epochs} epochs ({time.perf_counter() - start:.1f} s, compile "
              f"{history[0]['compile_seconds']:.1f} s); {_selection(config, history, last)}")
    if config.dataset == "text":
        console.print(
            f"[bold]{config.model}[/bold] on [bold]text[/bold]: test bits per character "
            f"[bold green]{last['test_bits_per_char']:.3f}[/bold green] (train "
            f"{last['train_bits_per_char']:.3f}), test accuracy {last['test_accuracy']:.2%} "
            f"{timing}", highlight=False)
        console.print(f"results: {out}/ (config.json with the vocabulary, metrics.jsonl, "
                      f"params.safetensors, curves.png); jaxnet generate {out} --prompt TEXT",
                      highlight=False)
        return
    score = (f"test MSE [bold green]{last['test_loss']:.4g}[/bold green], MAE "
             f"{last['test_mae']:.4g}" if config.task == "regression" else
             f"test accuracy [bold green]{last['test_accuracy']:.2%}[/bold green], test loss "
             f"{last['test_loss']:.4f}")
    console.print(f"[bold]{config.model}[/bold] on [bold]{dataset.name}[/bold]: {score} {timing}",
                  highlight=False)
    files = "config.json, metrics.jsonl, params.safetensors, curves.png"
    console.print(f"results: {out}/ ({files}{', checkpoints/' if config.checkpoint_every else ''})")


def _selection(config: "RunConfig", history: list[dict], chosen: dict) -> str:
    """Which epoch's params the run kept, and how it was chosen."""
    if not config.validation_split:
        return ("kept the last epoch (--validation-split 0: no validation, the test metrics "
                "chose nothing)")
    accuracy = (f", accuracy {chosen['val_accuracy']:.2%}" if "val_accuracy" in chosen else "")
    stopped = (f", stopped early (--patience {config.patience})"
               if history[-1]["epoch"] < config.epochs else "")
    return (f"kept epoch {chosen['epoch']}, chosen by its validation loss "
            f"{chosen['val_loss']:.4f}{accuracy}{stopped}")


def cmd_eval(args, console: Console) -> None:
    import jax.numpy as jnp

    from jaxnet.inference import predict
    from jaxnet.losses import softmax_cross_entropy
    from jaxnet.metrics import accuracy, confusion_matrix
    from jaxnet.app.run import load_data, read_run

    config, record, net, params = read_run(args.run_dir)
    dataset, _ = load_data(config)
    if config.dataset == "text":
        _eval_text(args.run_dir, config, net, params, dataset, console)
        return
    if config.task == "regression":
        _eval_regression(args.run_dir, config, net, params, dataset, console)
        return
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


def _eval_regression(run_dir, config, net, params, dataset, console: Console) -> None:
    import numpy as np

    from jaxnet.inference import predict

    errors = predict(net, params, dataset.x_test, precision=config.precision) - dataset.y_test
    console.print(f"{run_dir}: {config.model} on {dataset.name}, {len(dataset.x_test)} test "
                  f"examples, {dataset.num_classes} target{'s' * (dataset.num_classes != 1)} "
                  f"each: mean squared error "
                  f"{float(np.mean(np.square(errors, dtype=np.float64))):.4g}, mean absolute "
                  f"error {float(np.mean(np.abs(errors), dtype=np.float64)):.4g}", highlight=False)


def _eval_text(run_dir, config, net, params, dataset, console: Console) -> None:
    import math

    import jax.numpy as jnp

    from jaxnet.inference import predict
    from jaxnet.losses import token_cross_entropy

    logits = jnp.asarray(predict(net, params, dataset.x_test, batch_size=256,
                                 precision=config.precision))
    labels = jnp.asarray(dataset.y_test)
    loss = float(token_cross_entropy(logits, labels).mean())
    accuracy = float((jnp.argmax(logits, axis=-1) == labels).mean())
    console.print(f"{run_dir}: {config.model} on text, {labels.size} test characters: "
                  f"{loss / math.log(2):.3f} bits per character (loss {loss:.4f}), next-character "
                  f"accuracy {accuracy:.2%}", highlight=False)


def cmd_predict(args, console: Console) -> None:
    from jaxnet.data import open_npy
    from jaxnet.inference import predict_to_file
    from jaxnet.app.run import read_run, run_preprocess
    from jaxnet.app.rundir import remove_leftovers

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: directory {args.output.parent} does not exist")
    _check_predict_output(args)
    config, record, net, params = read_run(args.run_dir)
    if config.dataset == "text":
        raise UsageError(f"{args.run_dir} is a language model (--dataset text); use jaxnet "
                         "generate")
    if args.proba and config.task == "regression":
        raise UsageError(f"--proba: {args.run_dir} is a regression run (--task regression); "
                         "its outputs are the predicted values, not class scores")
    x = open_npy(args.input)
    try:
        preprocess = run_preprocess(record["data"], x.shape, x.dtype)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--input {args.input}: {error}") from None
    remove_leftovers(args.output.parent, [args.output.name])  # of a killed predict
    start = time.perf_counter()
    predict_to_file(net, params, x, args.output, batch_size=args.batch_size, proba=args.proba,
                    progress=args.progress, preprocess=preprocess, precision=config.precision)
    what = ("probabilities" if args.proba else
            "predictions" if config.task == "regression" else "logits")
    console.print(f"{args.output}: {what} of shape ({len(x)}, {record['data']['num_classes']}) "
                  f"for {args.input} ({time.perf_counter() - start:.1f} s)", highlight=False)


def _check_predict_output(args) -> None:
    """``--output`` must not be ``--input`` (nor a link to it) nor lie in a run directory."""
    import os

    from jaxnet.app.rundir import is_inside_run

    output, source = args.output, args.input
    if output.is_dir():
        raise UsageError(f"--output {output}: is a directory; give a .npy file name")
    with contextlib.suppress(OSError):
        a, b = os.stat(output), os.stat(source)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            raise UsageError(f"--output {output} is the --input file {source}; writing it would "
                             "destroy the inputs; choose another --output")
    if (run := is_inside_run(output)) is not None:
        raise UsageError(f"--output {output} lies inside the run directory {run}; write "
                         "predictions outside run directories")


def cmd_generate(args, console: Console) -> None:
    import jax

    from jaxnet.runs import is_language_model, load_run
    from jaxnet.text import Vocabulary, generate

    if args.length < 0:
        raise UsageError(f"--length must be an integer >= 0, got {args.length}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.prompt:
        raise UsageError("--prompt must hold at least one character")
    run = load_run(args.run_dir)
    data = run.config["data"]
    if not is_language_model(data):
        raise UsageError(f"{args.run_dir} is not a language model run (it was trained on "
                         f"{data.get('name')}); train one with --dataset text")
    vocab = Vocabulary(data["vocab"])
    if missing := vocab.unknown(args.prompt):
        shown = ", ".join(repr(c) for c in missing)
        raise UsageError(f"--prompt has characters that are not in the run's vocabulary: {shown}")
    tokens = generate(run.net, run.params, vocab.encode(args.prompt), args.length,
                      context=int(data["example_shape"][0]), temperature=args.temperature,
                      key=jax.random.key(args.seed), model_state=run.model_state)
    sys.stdout.write(args.prompt + vocab.decode(tokens) + "\n")


def cmd_sweep(args, console: Console) -> None:
    from jaxnet.app.rundir import (LOCK_FILE, RUN_FILES, SWEEP_FILES, RunLock, prepare_new,
                                   remove_leftovers)
    from jaxnet.app.sweep import GRID, describe_best, format_settings, sweep, sweep_configs

    base = _config_from(args)
    grid = {name: getattr(args, f"grid_{name}") for name in GRID
            if getattr(args, f"grid_{name}") is not None}
    out = args.out or Path("runs") / f"sweep-{base.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    sweep_configs(base, args.seeds, grid)  # bad values fail here, before any file is written
    guard = _RemovedIfUnused(out, ("sweep.json", "metrics.jsonl", LOCK_FILE))
    with RunLock(out), guard:  # on a refusal, the guard removes the .lock it made
        prepare_new(out, "sweep", args.force)
        guard.rebase()
        remove_leftovers(out, SWEEP_FILES)
        remove_leftovers(out / "best", RUN_FILES)
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
    console.print(describe_best(results), highlight=False)
    console.print(f"results: {out}/ (results.md, results.json, metrics.jsonl, curves.png, best/)")


def cmd_summary(args, console: Console) -> None:
    import jax
    import numpy as np

    from jaxnet.app.run import build_model, data_record, load_data, read_run
    from jaxnet.nn.summary import summarize
    from jaxnet.runs import is_language_model

    if args.run_dir is not None:
        _, record, net, _ = read_run(args.run_dir)
        data = record["data"]
    else:
        config = _config_from(args)
        dataset, stats = load_data(config)
        data = data_record(dataset, stats)
        net = build_model(config, data)
    dtype = np.int32 if is_language_model(data) else np.float32  # token ids, or inputs
    spec = jax.ShapeDtypeStruct((1, *data["example_shape"]), dtype)
    console.print(str(summarize(net, spec)), highlight=False)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
            "generate": cmd_generate, "sweep": cmd_sweep, "summary": cmd_summary}


# Names in the library's and RunConfig's messages, and the flags that set them.
_FLAGS = {"batch_size": "--batch-size", "batch-size": "--batch-size", "epochs": "--epochs",
          "hidden": "--hidden", "hidden sizes": "--hidden sizes", "lr": "--lr",
          "learning_rate": "--lr", "weight_decay": "--weight-decay",
          "weight-decay": "--weight-decay", "drop_rate": "--drop-rate", "drop-rate": "--drop-rate",
          "init_scale": "--init-scale", "seed": "--seed", "init-scale": "--init-scale", "seeds": "--seeds",
          "checkpoint-every": "--checkpoint-every", "keep-checkpoints": "--keep-checkpoints",
          "on_nan": "--on-nan", "on-nan": "--on-nan", "precision": "--precision",
          "devices": "--devices", "mesh": "--mesh", "layers": "--layers", "heads": "--heads",
          "seq-len": "--seq-len", "max-chars": "--max-chars", "num-processes": "--num-processes",
          "process-id": "--process-id", "coordinator": "--coordinator",
          "validation-split": "--validation-split", "patience": "--patience", "task": "--task"}
_ARGUMENTS = {"data_dir", "coordinator", "num_processes", "process_id"}
_FLAGS.update({name: "--" + name.replace("_", "-") for name in _ARGUMENTS})
_NAMED = re.compile(r"(?:(?:fit|fit_population|predict|data_mesh|sweep|train): )?"
                    r"(?P<name>[a-z_-]+(?: sizes)?)(?P<rest>(?: must |: | -?\d+ does not ).*)",
                    re.S)


def _with_flag_names(message: str) -> str:
    """A message that starts with an argument's name (``fit: batch_size must be ...``,
    ``epochs must be ...``), with the command-line flag instead (``--batch-size must be ...``)."""
    # the library writes argument names in backticks inside a sentence: `data_dir`
    message = re.sub(r"`([a-z_]+)`", lambda m: _FLAGS[m[1]] if m[1] in _ARGUMENTS else m[0],
                     message)
    match = _NAMED.fullmatch(message)
    if match is None or match["name"] not in _FLAGS:
        return message
    return _FLAGS[match["name"]] + match["rest"]


def _resource_message(error: BaseException, args) -> str | None:
    """One line for a number too large, a structure too deep, or memory running out (XLA's
    errors say RESOURCE_EXHAUSTED or Out of memory), naming the size flags given; None for
    other errors."""
    text = " ".join(str(error).split())
    out_of_memory = isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and not isinstance(error, RecursionError)
        and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text))
    if isinstance(error, RuntimeError) and not isinstance(error, RecursionError) \
            and not out_of_memory:
        return None
    given = [f"{flag} {_shown(getattr(args, name))}" for flag, name in
             (("--hidden", "hidden"), ("--batch-size", "batch_size"), ("--seq-len", "seq_len"),
              ("--seeds", "seeds"))
             if getattr(args, name, None) is not None]
    sizes = f" (with {', '.join(given)})" if given else ""
    text = text[:300] + ("..." if len(text) > 300 else "")
    if out_of_memory:
        return f"out of memory{sizes}: {text or type(error).__name__}; try smaller sizes"
    if isinstance(error, RecursionError):
        return f"input nested too deeply{sizes}: {text}"
    return f"a number is too large{sizes}: {text}"


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@contextlib.contextmanager
def _warnings_as_lines():
    """Python warnings (a run read unverified) as one ``jaxnet: warning:`` line each on stderr;
    the warning filters stay as they are."""
    import warnings

    def show(message, *_, **__):
        print(f"jaxnet: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxnet`` command; returns the exit status."""
    from jaxnet.app.rundir import DirectoryError
    from jaxnet.data import DataError
    from jaxnet.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # the command opts in (JAXNET_HOST_MALLOC=default opts out)
    # logs and pipes get whole lines; a terminal, lines wrapped at its width
    console = Console(soft_wrap=not sys.stdout.isatty())
    args = None
    try:
        args = build_parser().parse_args(argv)
        with _warnings_as_lines():
            COMMANDS[args.command](args, console)
    except (UsageError, DirectoryError, DataError, ValueError, TypeError, OSError,
            FloatingPointError) as error:
        message = " ".join(str(error).split())
        if isinstance(error, (ValueError, TypeError)) and not isinstance(error, DataError):
            message = _with_flag_names(message)
        print(f"jaxnet: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except (OverflowError, RecursionError, MemoryError, RuntimeError) as error:
        message = _resource_message(error, args)
        if message is None:
            raise  # a bug: its traceback is wanted
        print(f"jaxnet: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("jaxnet: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
