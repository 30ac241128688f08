"""Run directories of ``jaxnet train``, read back as a network, its parameters and its inputs.

A finished run directory holds ``config.json`` (the settings under ``"config"``, the data under
``"data"``: example shape, classes, standardisation, and for text runs the vocabulary) and
``params.safetensors`` (and ``model_state.safetensors`` for networks with state), whose
metadata repeats the settings and data, so that the file alone rebuilds the run. This module
rebuilds the network from the settings (:func:`build_model`, also what ``jaxnet train`` builds)
and the preprocessing the run applied to its inputs (:func:`preprocess_for`)::

    run = jaxnet.load_run("runs/digits-mlp-20250101-120000")
    logits = jaxnet.predict(run.net, run.params, run.preprocess(raw_images))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.models import cnn, mlp, transformer
from jaxnet.nn.basic import Dense, Embedding, Reshape
from jaxnet.nn.combinators import serial
from jaxnet.nn.global_pool import GlobalAvgPool
from jaxnet.nn.layer import Layer, shape_str
from jaxnet.nn.norm import LayerNorm
from jaxnet.nn.positional import LearnedPositionalEmbedding
from jaxnet.nn.recurrent import GRU, LSTM
from jaxnet.nn.transformer import TransformerBlock
from jaxnet.run_manifest import verify_run, warn_unverified
from jaxnet.tensorfile import load_metadata, load_params, read_regular

MODELS = ("mlp", "cnn", "lstm", "gru", "transformer")
SEQUENCE_MODELS = ("lstm", "gru", "transformer")
LANGUAGE_MODEL = "language_model"  # the data record's "task" for a text run
REGRESSION = "regression"  # ... for a regression run (num_classes: the number of outputs)
DEFAULT_LAYERS = {"lstm": 1, "gru": 1, "transformer": 2}
MAX_CONFIG_BYTES = 1 << 26  # a config.json (with a text run's vocabulary) is far smaller
PARAMS_FORMAT = "jaxnet-run"  # the "format" entry of a run's params file metadata
METADATA_KEYS = ("config", "data", "versions")  # the run record's entries in that metadata


class Run(NamedTuple):
    """A finished run, read back by :func:`load_run`.

    Attributes:
      net: the network, as ``jaxnet train`` built it.
      params: its trained parameters (JAX arrays).
      model_state: its state (``{}`` for networks without stateful layers).
      preprocess: raw inputs (as the data set's loader reads them: images ``(n, *example)``,
        ``(n, height, width)`` or ``(n, features)``, uint8 pixels or floats) to what the network
        was trained on, float32 ``(n, *example)``; for text runs, token ids to int32.
      config: the whole ``config.json`` record (``config``: the settings; ``data``: the data).
    """

    net: Layer
    params: Any
    model_state: Any
    preprocess: Callable[[np.ndarray], np.ndarray]
    config: dict


def _setting(config, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def is_language_model(data: Mapping) -> bool:
    """Whether a run's ``data`` record is a text corpus (next-token prediction)."""
    return data.get("task") == LANGUAGE_MODEL


def is_regression(data: Mapping) -> bool:
    """Whether a run's ``data`` record is a regression set (``num_classes`` outputs, MSE)."""
    return data.get("task") == REGRESSION


def build_model(config, data: Mapping) -> Layer:
    """The network a run's settings describe.

    Args:
      config: the settings, a mapping (``config.json``'s ``"config"``) or an object with the
        same attributes: ``model`` (one of ``MODELS``), ``hidden`` (MLP widths; the first is the
        recurrent width or the transformer's ``d_model``), ``activation``, ``drop_rate``,
        ``layers`` (recurrent layers or transformer blocks; None: 1, or 2 for the transformer),
        ``heads`` (attention heads).
      data: the data record: ``num_classes`` (for text, the vocabulary size; for regression,
        ``task == "regression"``, the number of outputs), ``example_shape``
        and, for text, ``task == "language_model"``.

    Returns:
      Images: ``mlp``, ``cnn``, or a sequence model over the image rows as time steps
      (``(height, width * channels)``): ``lstm``/``gru`` (the last step's output to a Dense
      classifier) or ``transformer`` (rows projected to ``d_model``, learned positions,
      encoder blocks, LayerNorm, mean over the rows, Dense). Text: a causal language model,
      ``transformer`` (:func:`jaxnet.models.transformer`) or ``lstm``/``gru`` (Embedding,
      recurrent layers, Dense to the vocabulary).

    Raises:
      ValueError: an unknown model, or one that does not fit the data (mlp/cnn on text).
    """
    model = _setting(config, "model")
    hidden = tuple(_setting(config, "hidden", (256,)) or (256,))
    activation, drop_rate = _setting(config, "activation", "relu"), _setting(config, "drop_rate", 0.0)
    layers = _setting(config, "layers") or DEFAULT_LAYERS.get(model, 1)
    heads = _setting(config, "heads", 4) or 4
    num_classes, example = int(data["num_classes"]), tuple(int(d) for d in data["example_shape"])
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {model!r}")
    if is_language_model(data):
        if model not in SEQUENCE_MODELS:
            raise ValueError(f"model {model!r} does not fit text; use one of "
                             f"{', '.join(SEQUENCE_MODELS)}")
        if model == "transformer":
            return transformer(num_classes, num_blocks=layers, features=hidden[0],
                               num_heads=heads, max_length=example[0], drop_rate=drop_rate)
        cell = LSTM if model == "lstm" else GRU
        return serial(Embedding(num_classes, hidden[0]),
                      *[cell(hidden[0], return_sequences=True) for _ in range(layers)],
                      Dense(num_classes))
    if model == "cnn":
        return cnn(num_classes, activation, drop_rate)
    if model == "mlp":
        return mlp(hidden, num_classes, activation, drop_rate)
    rows = Reshape((example[0], int(np.prod(example[1:], dtype=int))))  # rows are time steps
    if model == "transformer":
        return serial(rows, Dense(hidden[0]), LearnedPositionalEmbedding(example[0]),
                      *[TransformerBlock(heads, drop_rate=drop_rate) for _ in range(layers)],
                      LayerNorm(), GlobalAvgPool(), Dense(num_classes))
    cell = LSTM if model == "lstm" else GRU
    return serial(rows, *[cell(hidden[0], return_sequences=i < layers - 1) for i in range(layers)],
                  Dense(num_classes))


def preprocess_for(data: Mapping, input_shape: tuple[int, ...], input_dtype
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing a run applied, for raw inputs of ``input_shape`` and ``input_dtype``.

    Images: ``uint8`` values are pixels in 0..255 and are scaled by 1/255 (as the IDX and
    ``.npz`` loaders do); other numbers are taken as they are, as float32 (the loaders' values);
    then ``(x - mean) / std`` with the training set's statistics, as training computed it.
    Text: integer token ids, cast to int32.

    Args:
      data: the ``data`` record of the run's ``config.json`` (``example_shape``, ``mean``,
        ``std``).
      input_shape: ``(n, *shape)``: ``shape`` is the run's example shape (``(8, 8, 1)``), that
        shape without a trailing channel axis of size 1 (``(8, 8)``), or flattened (``(64,)``).
      input_dtype: an integer or floating NumPy dtype (integer for text).

    Returns:
      ``(rows, *shape)`` raw values to ``(rows, *example_shape)`` float32 (int32 for text).

    Raises:
      ValueError: ``input_shape`` is none of the accepted forms (the message names them).
      TypeError: ``input_dtype`` is not a number type (for text: not an integer type).
    """
    example = tuple(int(d) for d in data["example_shape"])
    size = int(np.prod(example))
    accepted = [example] + ([example[:-1]] if example[-1:] == (1,) else []) + [(size,)]
    accepted = list(dict.fromkeys(accepted))  # (n,) examples: the forms coincide
    if len(input_shape) == 0 or tuple(input_shape[1:]) not in accepted:
        forms = ", ".join(shape_str(("n",) + a) for a in accepted)
        raise ValueError(f"inputs of shape {shape_str(tuple(input_shape))} do not fit the run's "
                         f"examples of shape {shape_str(example)}; expected {forms}")
    input_dtype = np.dtype(input_dtype)
    if is_language_model(data):
        if input_dtype.kind not in "ui":
            raise TypeError(f"a text run's inputs are integer token ids, got dtype {input_dtype}")
        return lambda chunk: np.asarray(chunk).astype(np.int32).reshape((len(chunk),) + example)
    if input_dtype.kind not in "uif":
        raise TypeError(f"inputs must be numbers (integer or float), got dtype {input_dtype}")
    mean, std = np.float32(data["mean"]), np.float32(data["std"])

    def preprocess(chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk)
        x = chunk / np.float32(255) if chunk.dtype == np.uint8 else chunk.astype(np.float32)
        return ((x - mean) / std).reshape((len(chunk),) + example)

    return preprocess


def read_record(run_dir) -> dict:
    """The ``config.json`` record of a run directory, checked for the entries a run needs.

    Raises:
      FileNotFoundError: no ``config.json`` (the message names it).
      ValueError: it is not valid JSON or lacks ``config.model`` or ``data.num_classes`` /
        ``data.example_shape``.
    """
    config_file = Path(run_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; is {run_dir} a jaxnet run directory?")
    return _checked_record(lambda: json.loads(read_regular(config_file, MAX_CONFIG_BYTES)),
                           config_file)


def _checked_record(load: Callable[[], dict], source) -> dict:
    """``load()``, a run record, checked for the entries and values a run needs; errors name
    ``source``."""
    try:
        record = load()
        str(record["config"]["model"])
        int(record["data"]["num_classes"])
        [int(d) for d in record["data"]["example_shape"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{source}: not a valid jaxnet run config ({type(error).__name__}: "
                         f"{error})") from None
    if problem := _bad_value(record):
        raise ValueError(f"{source}: {problem}")
    return record


def params_metadata(record: Mapping) -> dict[str, str]:
    """What a run's ``params.safetensors`` carries in its header's ``__metadata__`` so that the
    file alone rebuilds the network (as a Hugging Face file carries its config): the run
    record's ``config``, ``data`` and ``versions`` as JSON strings, and ``format: jaxnet-run``."""
    return {"format": PARAMS_FORMAT, **{key: json.dumps(record[key]) for key in METADATA_KEYS
                                        if key in record}}


def params_record(params_file) -> dict | None:
    """The run record (``config``, ``data``, ``versions``) in a params file's metadata, checked
    as ``config.json`` is; None when the file carries none (not written by ``jaxnet train``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is damaged, or its metadata is not a valid run record.
    """
    metadata = load_metadata(params_file)
    if metadata.get("format") != PARAMS_FORMAT:
        return None
    return _checked_record(lambda: {key: json.loads(metadata[key]) for key in METADATA_KEYS
                                    if key in metadata}, f"{params_file} (metadata)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad_value(record: dict) -> str | None:
    """What is wrong with the values of a ``config.json`` record (a hand edit, a damaged file):
    names the key, or None."""
    data, config = record["data"], record["config"]
    if not isinstance(data, Mapping) or not isinstance(config, Mapping):
        return "config and data must be JSON objects"
    classes = data["num_classes"]
    if not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1):
        return f"data.num_classes must be a positive integer, got {classes!r}"
    shape = data["example_shape"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                            and d >= 1 for d in shape)):
        return f"data.example_shape must be a list of positive integers, got {shape!r}"
    for key in ("mean", "std"):
        if key in data and not _is_number(data[key]):
            return f"data.{key} must be a finite number, got {data[key]!r}"
    if "std" in data and not data["std"] > 0:
        return f"data.std must be positive, got {data['std']!r}"
    for key in ("lr", "weight_decay", "drop_rate", "init_scale"):
        if key in config and not _is_number(config[key]):
            return f"config.{key} must be a finite number, got {config[key]!r}"
    return None


def _read_tensors(path: Path, what: str):
    try:
        return jax.tree.map(jnp.asarray, load_params(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the run in {path.parent} did not finish (or "
                                f"is not a jaxnet run directory), so it has no {what}") from None


def _locate(path: Path) -> tuple[Path, Path, dict]:
    """``(run directory, params file, record)`` of a run directory or of a params file alone;
    a directory's ``config.json`` is its record, else its params file's metadata."""
    if path.is_file():
        record = params_record(path)
        if record is None:
            raise ValueError(f"{path}: its safetensors header carries no jaxnet run metadata "
                             "(written by jaxnet train), so the network cannot be rebuilt from "
                             "the file alone; load its run directory, with config.json")
        return path.parent, path, record
    params_file = path / "params.safetensors"
    if not (path / "config.json").exists() and params_file.is_file():
        if (record := params_record(params_file)) is not None:
            return path, params_file, record
    return path, params_file, read_record(path)


def load_run(run_dir) -> Run:
    """Reads a finished ``jaxnet train`` run back (see :class:`Run`): its directory, or its
    ``params.safetensors`` file alone, whose metadata carries the settings and the data
    record (:func:`params_metadata`). A directory without ``config.json`` is read from its
    params file's metadata too.

    ``jaxnet.predict(run.net, run.params, run.preprocess(x), model_state=run.model_state)``
    gives what ``jaxnet predict RUN_DIR`` writes for the raw inputs ``x``.

    Raises:
      FileNotFoundError: ``config.json`` or ``params.safetensors`` is missing (the message
        names the file).
      ValueError: ``config.json`` is not a valid run config, a tensor file is damaged, or a
        params file given alone carries no run metadata (the message names the file).
      jaxnet.run_manifest.RunVerificationError: (a ValueError) a file differs from what the
        run's ``run_manifest.json`` recorded, is missing, or the run has not finished; checked
        before anything is read. A run without a manifest (an older jaxnet's) is read with an
        ``UnverifiedRunWarning``.
    """
    path = Path(run_dir)  # a params file alone: verified with its directory's manifest, if any
    manifest = verify_run(path.parent if path.is_file() else path)
    run_dir, params_file, record = _locate(path)
    net = build_model(record["config"], record["data"])
    params = _read_tensors(params_file, "trained parameters")
    state_file = run_dir / "model_state.safetensors"
    model_state = _read_tensors(state_file, "model state") if state_file.is_file() else {}
    data = record["data"]

    def preprocess(x) -> np.ndarray:
        x = np.asarray(x)
        return preprocess_for(data, x.shape, x.dtype)(x)

    if manifest is None and (run_dir / "config.json").is_file():
        warn_unverified(run_dir)
    return Run(net, params, model_state, preprocess, record)
