"""``jaxnet export RUN_DIR --format stablehlo|onnx --output FILE``: a run as one file that serves
without jaxnet (:func:`jaxnet.export`), next to a JSON sidecar ``FILE.json``.

The exported program folds in what ``jaxnet predict`` does to its inputs: it takes raw float32
inputs ``(batch, *example)``, as the data set's loader reads them (for the image sets, pixels
in [0, 1]), standardises them with the run's statistics and returns logits, or probabilities
with ``--proba``, ``(batch, classes)`` (a regression run: its predictions ``(batch,
outputs)``). A text run's program takes token ids ``(batch, seq_len)`` int32 and returns the
next-token logits at every position ``(batch, seq_len, vocab)``; the sidecar holds the
vocabulary.

Refusals are ``ValueError``/``FileExistsError`` with one-line messages naming the flag or file,
which the command reports with exit status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console


def add_parser(commands) -> None:
    """The ``export`` subcommand, on the ``jaxnet`` command's subparsers."""
    from jaxnet.export import FORMATS

    parser = commands.add_parser(
        "export", help="a run as a StableHLO or ONNX file that serves without jaxnet",
        description="Writes FILE (the run's preprocessing, network and optionally softmax as one "
                    "program with a symbolic batch axis) and FILE.json (inputs, outputs, "
                    "versions, sha256). Inputs are raw float32 values (batch, *example), as the "
                    "data set's loader reads them; text runs take int32 token ids.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a finished run directory (from jaxnet train), or its "
                             "params.safetensors alone")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                        help="stablehlo: jax.export bytes, run with JAX alone; onnx: for "
                             "onnxruntime, needs pip install 'jaxnet[onnx]' (default: stablehlo)")
    parser.add_argument("--output", type=Path, required=True, metavar="FILE",
                        help="the file to write (and FILE.json); written only when complete")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing FILE and FILE.json")
    parser.add_argument("--proba", action="store_true",
                        help="the program returns probabilities (softmax) instead of logits")


def _check_output(output: Path, run_dir: Path, force: bool) -> None:
    """``--output`` (and its sidecar) may be written: a new file, or ``--force``, in an existing
    directory that is no run directory."""
    from jaxnet.app.rundir import is_inside_run

    if output.is_dir():
        raise ValueError(f"--output {output}: is a directory; give a file name")
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: directory {output.parent} does not exist")
    inside = is_inside_run(output)
    if inside is None and Path(os.path.abspath(run_dir)) in Path(os.path.abspath(output)).parents:
        inside = run_dir  # a run directory without config.json is one too
    if inside is not None:
        raise ValueError(f"--output {output} lies inside the run directory {inside}; write "
                          "exports outside run directories")
    for path in (output, output.with_name(output.name + ".json")):
        if path.exists() and not force:
            raise FileExistsError(f"--output {output}: {path} exists; pass --force to overwrite it")


def cmd_export(args: argparse.Namespace, console: Console) -> None:
    """``jaxnet export``: checks the output first, then reads the run and writes the files."""
    import jax

    from jaxnet.app.rundir import remove_leftovers
    from jaxnet.export import export
    from jaxnet.runs import is_language_model, is_regression, load_run

    _check_output(args.output, args.run_dir, args.force)
    if args.format == "onnx":
        from jaxnet._onnx_export import import_jax2onnx
        try:
            import_jax2onnx()
        except ImportError as error:
            raise ValueError(f"--format onnx: {error}") from None
    run = load_run(args.run_dir)
    config, data = run.config["config"], run.config["data"]
    text = is_language_model(data)
    if args.proba and is_regression(data):
        raise ValueError(f"--proba: {args.run_dir} is a regression run (--task regression); its "
                         "outputs are the predicted values, not class scores")
    what = ("probabilities" if args.proba else
            "predictions" if is_regression(data) else "logits")
    dtype = "int32" if text else "float32"  # token ids, or raw values as the loader reads them
    example = (1, *data["example_shape"])
    # preprocess_for's standardisation, as export's (mean, std) pair: traced, not NumPy
    preprocess = None if text else (data["mean"], data["std"])
    metadata = {"run": str(args.run_dir), "model": config["model"], "dataset": data.get("name"),
                "task": data.get("task", "classification"),
                **({"vocab": data["vocab"]} if text else {})}
    remove_leftovers(args.output.parent, [args.output.name, args.output.name + ".json"])
    try:
        path = export(run.net, run.params, jax.ShapeDtypeStruct(example, dtype),
                      model_state=run.model_state, format=args.format, output=args.output,
                      preprocess=preprocess, proba=args.proba, force=args.force,
                      precision=config.get("precision"), metadata=metadata, output_name=what)
    except NotImplementedError as error:  # a layer ONNX cannot express: the message names it
        raise ValueError(f"{args.run_dir}: {error}") from None
    shape = ", ".join(map(str, ["batch", *example[1:]]))
    inputs = f"{'token ids' if text else 'raw inputs'} ({shape})"
    console.print(f"{path}: {args.format} program from {inputs} {dtype} to {what}; sidecar "
                  f"{path}.json", highlight=False)
