"""A training run from a config: data, model, optimizer, ``fit``, and the run directory.

A run directory holds ``config.json`` (everything needed to rerun it exactly),
``metrics.jsonl`` (one JSON object per epoch, written as the run goes; the kept epoch's is
marked ``"chosen": true`` at the end), ``checkpoints/`` (with
``checkpoint_every``: the whole training state every so many epochs, see
:mod:`jaxnet.checkpoint`), ``curves.png`` (loss and accuracy by epoch) and, written last,
``params.safetensors`` (the kept epoch's parameters). ``train(config, run_dir, resume=True)``
continues a killed run from its latest checkpoint and ends with the same parameters, bit for
bit, as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.multihost_utils import process_allgather

from jaxnet._version import __version__
from jaxnet import data as datasets
from jaxnet import data_parallel
from jaxnet import data_shards
from jaxnet import sharding
from jaxnet import text
from jaxnet.checkpoint import (CheckpointError, check_checkpoints, check_finite,
                               latest_checkpoint, list_checkpoints, restore_checkpoint,
                               save_checkpoint)
from jaxnet.nn.layer import Layer
from jaxnet.inference import Preprocess
from jaxnet.losses import mean_squared_error, softmax_cross_entropy, token_cross_entropy
from jaxnet.runs import (LANGUAGE_MODEL, MODELS, REGRESSION, SEQUENCE_MODELS, build_model,
                         load_run, params_metadata, preprocess_for, read_record)
from jaxnet.app.plots import plot_curves
from jaxnet.app.rundir import strict_dumps
from jaxnet.precision import TRAINING_PRECISIONS
from jaxnet.run_manifest import (CONFIG_FILE, PARAMS_FILE, STATE_FILE, is_finished, verify_run,
                                 warn_unverified, write_run_manifest)
from jaxnet.sharded_checkpoint import list_sharded, restore_sharded, save_sharded
from jaxnet.tensorfile import atomic_write, save_params
from jaxnet.train import ON_NAN, TrainState, evaluate, fit, init_train_state
from jaxnet.train.callbacks import VALIDATION, EarlyStopping

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "rmsprop")
SCHEDULES = ("constant", "cosine")
MAX_WIDTH = 1 << 24  # the widest hidden layer a config may ask for


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; saved as ``config.json``.

    The defaults train the classic network (a ReLU MLP with a softmax output) on digits.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    data: str | None = None  # the .npz file for dataset "npz"
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)  # lstm/gru/transformer: the first is the width
    layers: int | None = None  # recurrent layers / transformer blocks; None: 1 (2 transformer)
    heads: int = 4  # attention heads of the transformer
    seq_len: int = 128  # dataset "text": characters per training window
    max_chars: int = 2_000_000  # dataset "text": characters read from the corpus, at most
    activation: str = "relu"
    drop_rate: float = 0.0
    init_scale: float = 1.0  # multiplies every initial parameter
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    standardize: bool = True
    checkpoint_every: int = 0  # epochs between checkpoints in RUN_DIR/checkpoints; 0: none
    keep_checkpoints: int = 3  # the newest ones kept
    on_nan: str = "stop"  # or "skip": leave out the updates of batches with a non-finite loss
    precision: str = "f32"  # "bf16": bfloat16 product operands; "bf16-full": bfloat16 forward
    devices: int | None = None  # data parallel over this many devices per process; None: all
    mesh: str | None = None  # "data=2,fsdp=4": a data x fsdp x model mesh (jaxnet.sharding)
    validation_split: float = 0.1  # training rows held out to choose the epoch on; 0: none
    patience: int = 0  # stop after this many epochs without a better validation; 0: never
    task: str = "classification"  # or "regression" (dataset npz): float targets, MSE loss

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        checks = [
            (self.model in MODELS, f"model must be one of {', '.join(MODELS)}; got {self.model!r}"),
            (self.dataset != "text" or self.model in SEQUENCE_MODELS,
             f"--model {self.model} does not fit --dataset text (a language model); use "
             f"{', '.join(SEQUENCE_MODELS)}"),
            (self.layers is None or _is_count(self.layers, 1), f"layers must be a positive integer, got {self.layers!r}"),
            (_is_count(self.heads, 1), f"heads must be a positive integer, got {self.heads!r}"),
            (_is_count(self.seq_len, 1), f"seq-len must be a positive integer, got {self.seq_len!r}"),
            (_is_count(self.max_chars, 2), f"max-chars must be an integer >= 2, got {self.max_chars!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}"),
            (all(isinstance(h, int) and h > 0 for h in self.hidden), f"hidden sizes must be positive integers, got {self.hidden}"),
            # wider layers (gigabytes per input feature) only exhaust memory, after a long try
            (all(h <= MAX_WIDTH for h in self.hidden if isinstance(h, int)), f"hidden sizes must be at most {MAX_WIDTH} (2**24), got {self.hidden}"),
            (isinstance(self.epochs, int) and self.epochs > 0, f"epochs must be a positive integer, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size > 0, f"batch-size must be a positive integer, got {self.batch_size!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay), f"weight-decay must be a finite number >= 0, got {self.weight_decay!r}"),
            (_is_count(self.seed, -2**63) and self.seed < 2**63, f"seed must be an integer in [-2**63, 2**63), got {self.seed!r}"),
            (0 <= self.drop_rate < 1, f"drop-rate must be in [0, 1), got {self.drop_rate!r}"),
            (self.init_scale > 0 and math.isfinite(self.init_scale), f"init-scale must be a positive number, got {self.init_scale!r}"),
            (_is_count(self.checkpoint_every, 0), f"checkpoint-every must be an integer >= 0, got {self.checkpoint_every!r}"),
            (_is_count(self.keep_checkpoints, 1), f"keep-checkpoints must be a positive integer, got {self.keep_checkpoints!r}"),
            (self.on_nan in ON_NAN, f"on-nan must be one of {', '.join(ON_NAN)}; got {self.on_nan!r}"),
            (self.precision in TRAINING_PRECISIONS, f"precision must be one of "
             f"{', '.join(TRAINING_PRECISIONS)}; got {self.precision!r}"),
            (self.devices is None or _is_count(self.devices, 1), f"devices must be a positive integer, got {self.devices!r}"),
            (self.mesh is None or self.devices is None, f"--mesh {self.mesh} and --devices "
             f"{self.devices} cannot be combined: the mesh's sizes cover every device"),
            (isinstance(self.validation_split, (int, float)) and not isinstance(self.validation_split, bool)
             and 0 <= self.validation_split < 1, f"validation-split must be in [0, 1), got {self.validation_split!r}"),
            (_is_count(self.patience, 0), f"patience must be an integer >= 0, got {self.patience!r}"),
            (self.task in datasets.TASKS, f"task must be one of {', '.join(datasets.TASKS)}; got {self.task!r}"),
            (self.task == "classification" or self.dataset == "npz", f"--task {self.task} needs "
             f"your own data, --dataset npz --data FILE.npz (got --dataset {self.dataset})"),
            (not self.patience or self.validation_split, f"patience must be 0 when validation-split is 0 "
             f"(early stopping needs validation data), got {self.patience!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.mesh is not None:
            sharding.parse_mesh(self.mesh)  # raises, quoting it

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config entries {unknown}")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The config as JSON values (tuples become lists), as stored in files."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def shards_params(config: RunConfig) -> bool:
    """Whether the run's ``--mesh`` splits params (``fsdp`` or ``model`` above 1): its
    checkpoints are then Orbax sharded checkpoints that every process writes."""
    sizes = sharding.parse_mesh(config.mesh) if config.mesh else {}
    return sizes.get("fsdp", 1) * sizes.get("model", 1) > 1


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def load_data(config: RunConfig, mesh: jax.sharding.Mesh | None = None
              ) -> tuple[datasets.Dataset, dict[str, float]]:
    """The config's data set, standardised with the training set's mean and std when asked.

    With a ``mesh`` spanning several processes, each process reads only its block of training
    rows, ``data_parallel.process_rows(n, mesh)`` (``dataset.train_rows``), and the test set
    whole; the statistics and ``num_classes`` are still the whole data set's
    (:func:`jaxnet.data_shards.load_process_shard`; every process must call this alike).

    Returns:
      ``(dataset, stats)`` where ``stats = {"mean": m, "std": s}`` (0 and 1 when not standardised),
      with ``"task": "regression"`` for a regression set (float targets ``(n, outputs)``).
    """
    if config.dataset == "text":
        return load_text(config)
    if config.task == REGRESSION:
        if data_shards.spans_processes(mesh):
            raise ValueError("--task regression trains in one process (a multi-process run "
                             "reads classification sets)")
        dataset, stats = _standardized(config, datasets.load_dataset(
            config.dataset, path=config.data, task=config.task))
        return dataset, {**stats, "task": REGRESSION}
    if data_shards.spans_processes(mesh):
        return data_shards.load_process_shard(config.dataset, mesh=mesh, data_dir=config.data_dir,
                                              path=config.data, standardize=config.standardize)
    return _standardized(config, datasets.load_dataset(config.dataset, data_dir=config.data_dir,
                                                       path=config.data))


def _standardized(config: RunConfig, dataset: datasets.Dataset
                  ) -> tuple[datasets.Dataset, dict[str, float]]:
    """The inputs standardised when the config asks (targets never are), and the statistics."""
    if not config.standardize:
        return dataset, {"mean": 0.0, "std": 1.0}
    x_train, x_test, stats = datasets.standardize(dataset.x_train, dataset.x_test)
    return dataset._replace(x_train=x_train, x_test=x_test), stats


def load_text(config: RunConfig) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The text corpus as next-character data: ``x`` ``(n, seq_len)`` ids, ``y`` the ids one
    character on; "classes" are the vocabulary. The stats hold the vocabulary (written to
    ``config.json``'s data record, for ``jaxnet generate``)."""
    corpus = text.load_corpus(config.data_dir, seq_len=config.seq_len, max_chars=config.max_chars)
    dataset = datasets.Dataset(corpus.train[:, :-1], corpus.train[:, 1:], corpus.test[:, :-1],
                               corpus.test[:, 1:], len(corpus.vocab), "text")
    return dataset, {"mean": 0.0, "std": 1.0, "task": LANGUAGE_MODEL,
                     "vocab": list(corpus.vocab.chars)}


def data_record(dataset: datasets.Dataset, stats: dict[str, Any]) -> dict[str, Any]:
    """What ``config.json`` records of the data (what :func:`build_model` needs)."""
    return _data_record(dataset, stats)


VALIDATION_SEED = 0  # the held-out rows are the same for every --seed (and sweep member)


def split_validation(dataset: datasets.Dataset, fraction: float
                     ) -> tuple[datasets.Dataset, tuple[Any, Any] | None]:
    """``(dataset, (x_val, y_val))``: ``fraction`` of the training rows held out to choose the
    epoch on, ``round(fraction * n)`` rows picked by a fixed permutation
    (``numpy.random.default_rng(VALIDATION_SEED)``), the same whatever the run's seed, so that
    runs and sweep members are compared on the same examples. The training rows that remain
    keep their order. ``(dataset, None)`` for a fraction of 0.

    Raises:
      ValueError: a multi-process run (each process holds only its block of the training
        set), or a fraction that leaves no row for validation or for training.
    """
    if not fraction:
        return dataset, None
    if dataset.train_rows is not None:
        raise ValueError("validation-split must be 0 in a multi-process run: each process reads "
                         "only its block of the training set, so none can hold out rows of the "
                         f"whole set (got {fraction})")
    n = len(dataset.x_train)
    held = round(n * fraction)
    if not 0 < held < n:
        raise ValueError(f"validation-split must leave examples for validation and for "
                         f"training: {fraction} of {n} leaves {held} and {n - held}")
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(VALIDATION_SEED).permutation(n)[:held]] = True
    return (dataset._replace(x_train=dataset.x_train[~chosen], y_train=dataset.y_train[~chosen]),
            (dataset.x_train[chosen], dataset.y_train[chosen]))


def chosen_record(history: list[dict]) -> dict:
    """The record of the epoch whose params a run kept: the one marked ``"chosen": true``
    (it alone has the test metrics when the run chose on validation data), or the last."""
    return next((r for r in history if r.get("chosen")), history[-1])


class RunState(NamedTuple):
    """A checkpoint of a run that chooses its epoch on validation data: the ``TrainState``'s
    fields (under the same names) and ``best``, the state of the best epoch so far, which the
    run ends with; restoring it resumes the choice exactly."""

    params: Any
    model_state: Any
    opt_state: Any
    step: Any
    key: Any
    best: TrainState

    @property
    def train_state(self) -> TrainState:
        return TrainState(*self[:5])


def with_bits_per_char(record: dict) -> dict:
    """An epoch record of a text run with ``train_bits_per_char`` (and ``val_``, ``test_``
    where it has those losses): the per-character cross-entropy in bits, loss / ln 2."""
    for split in ("train", "val", "test"):
        if f"{split}_loss" in record:
            record[f"{split}_bits_per_char"] = record[f"{split}_loss"] / math.log(2)
    return record


def _optimizer(name: str, learning_rate, weight_decay) -> optax.GradientTransformation:
    """The named optimizer; weight decay is added to the gradient (decoupled for ``adamw``)."""
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    make = {"adam": lambda: optax.adam(learning_rate), "sgd": lambda: optax.sgd(learning_rate),
            "momentum": lambda: optax.sgd(learning_rate, momentum=0.9),
            "rmsprop": lambda: optax.rmsprop(learning_rate)}[name]
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return make()
    return optax.chain(optax.add_decayed_weights(weight_decay), make())


def build_optimizer(config: RunConfig, steps_per_epoch: int, *,
                    inject: bool = False) -> optax.GradientTransformation:
    """The config's optimizer; its learning rate decays to 0 over the run with ``cosine``.

    With ``inject``, the learning rate and weight decay are ``optax.inject_hyperparams`` values
    held in the optimizer state (population training sets one per member) and the cosine decay
    is a separate factor; the updates are the same.
    """
    total_steps, cosine = config.epochs * steps_per_epoch, config.schedule == "cosine"
    if not inject:
        lr = optax.cosine_decay_schedule(config.lr, total_steps) if cosine else config.lr
        return _optimizer(config.optimizer, lr, config.weight_decay)
    injected = optax.inject_hyperparams(functools.partial(_optimizer, config.optimizer))(
        learning_rate=config.lr, weight_decay=config.weight_decay)
    if not cosine:
        return injected
    return optax.chain(injected, optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, total_steps)))


def train(config: RunConfig, out_dir: Path | None = None, progress: bool | None = None, *,
          resume: bool = False) -> tuple[TrainState, list[dict], Layer, datasets.Dataset]:
    """Trains as ``config`` says; with ``out_dir``, writes the run directory as it goes.

    Training is data-parallel over ``config.devices`` devices of each process (default: all;
    see :mod:`jaxnet.data_parallel`). In a multi-process run (``data_parallel.initialize``
    first) every process calls ``train`` alike and only process 0 writes ``out_dir``; resuming
    reads it from every process, so it must be on a file system they share.

    Args:
      config: the run's settings.
      out_dir: the run directory (written as the run goes), or None to write nothing.
      progress: show a progress bar; where stderr is not a terminal, ``True`` prints one line
        per epoch instead (default: a bar when stderr is a terminal, else nothing).
      resume: continue the run in ``out_dir`` (whose ``config.json`` must hold ``config``) from
        its latest checkpoint, or from the start when it has none; ``metrics.jsonl`` is cut back
        to that checkpoint's epoch first. The result is bitwise that of an uninterrupted run.

    With ``config.validation_split`` (default 0.1) the run holds out that fraction of the
    training rows (:func:`split_validation`), records ``val_*`` every epoch, keeps the epoch of
    the lowest validation loss (stopping after ``config.patience`` epochs without a lower one,
    when given) and measures the test set once, on that epoch's params; without, it keeps the
    last epoch and records the test metrics of every epoch, which choose nothing.

    Returns:
      ``(state, history, network, dataset)``: ``state`` is the kept epoch's; ``history`` has
      every epoch of the run, the kept one marked ``"chosen": True``
      (:func:`chosen_record`). ``dataset`` holds the training rows trained on (in a
      multi-process run only this process's, ``dataset.train_rows`` of ``dataset.num_train``;
      see :func:`load_data`).

    Raises:
      CheckpointError: (``resume``) the latest checkpoint is damaged or from another run;
        nothing in ``out_dir`` is changed.
      FloatingPointError: the loss became NaN or infinite (``on_nan="stop"``); the message names
        the epoch, its steps, and the last good checkpoint.
    """
    if resume and out_dir is None:
        raise ValueError("train: resume=True needs out_dir, the run directory to continue")
    if resume:  # its files as the run recorded them (run_manifest.json), before reading any
        manifest = verify_run(out_dir, finished=False)
        if is_finished(out_dir, manifest):
            raise ValueError(f"{out_dir}: the run is finished (params.safetensors exists); "
                             "nothing to resume")
        if manifest is None:
            warn_unverified(out_dir)
    mesh = (sharding.make_mesh(**sharding.parse_mesh(config.mesh)) if config.mesh else
            data_parallel.data_mesh(config.devices))  # several processes: process 0 writes files
    # sharded params: every process saves its shards into out_dir/checkpoints (Orbax)
    sharded = shards_params(config)
    writes = out_dir is not None and data_parallel.is_main_process()
    dataset, stats = load_data(config, mesh)  # several processes: each reads only its rows
    dataset, validation = split_validation(dataset, config.validation_split)
    n_train = dataset.num_train
    data_parallel.check_batch_size(mesh, min(config.batch_size, n_train), "batch-size")
    language_model = config.dataset == "text"
    net = build_model(config, _data_record(dataset, stats))
    init_key, run_key = jax.random.split(jax.random.key(config.seed))
    # x_test: the same example shape, and never empty (this process may hold no training rows)
    params, model_state = net.init_with_state(init_key, dataset.x_test[:1])
    if config.init_scale != 1:
        params = jax.tree.map(lambda p: p * jnp.asarray(config.init_scale, p.dtype), params)
    steps_per_epoch = math.ceil(n_train / min(config.batch_size, n_train))
    optimizer = build_optimizer(config, steps_per_epoch)
    state = init_train_state(net, optimizer, params, model_state=model_state, key=run_key)
    history, on_epoch = [], None
    # with validation: keeps the epoch of the lowest validation loss, which the run ends with
    selector = None if validation is None else EarlyStopping(
        VALIDATION, patience=config.patience or None)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if resume:
            _check_same_data(out_dir, dataset, stats)
            if selector is None:
                state, history = _restore_run(out_dir / "checkpoints", state, config,
                                              mesh if sharded else None)
            else:
                saved, history = _restore_run(out_dir / "checkpoints", RunState(*state, state),
                                              config, mesh if sharded else None)
                state = saved.train_state
                selector.resume(history, saved.best)
        elif writes:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(out_dir, config, dataset, stats, mesh)
            write_run_manifest(out_dir, [CONFIG_FILE])  # --resume verifies config.json
    if writes:
        atomic_write(out_dir / "metrics.jsonl", "".join(strict_dumps(r) + "\n" for r in history).encode())
    if writes or (sharded and out_dir is not None):
        on_epoch = _run_writer(out_dir, config, history, language_model, selector, sharded,
                               writes)
    loss = (token_cross_entropy if language_model else
            mean_squared_error if config.task == REGRESSION else softmax_cross_entropy)
    try:
        state, new = fit(net, state, optimizer, (dataset.x_train, dataset.y_train), loss=loss,
                         epochs=config.epochs, batch_size=config.batch_size,
                         # with validation, the test set only measures the chosen epoch
                         eval_data=(dataset.x_test, dataset.y_test) if selector is None else None,
                         validation_data=validation, callbacks=[selector] if selector else [],
                         progress=progress if data_parallel.is_main_process() else False,
                         on_epoch=on_epoch, on_nan=config.on_nan, precision=config.precision,
                         mesh=mesh if mesh.size > 1 else None,  # one device: the plain path
                         num_examples=None if dataset.train_rows is None else n_train)
        if writes or sharded:  # the last update may have diverged with a finite loss before it
            check_finite(state, "the end of the run: not saved")  # (every process: collectives)
        if sharded:  # the files hold whole arrays: each process gathers them
            state = state._replace(params=process_allgather(state.params, tiled=True))
    except FloatingPointError as error:
        if out_dir is None:
            raise
        last = latest_checkpoint(out_dir / "checkpoints")
        kept = (f"the last good checkpoint is {last}" if last is not None else
                "no checkpoint was written" + ("" if config.checkpoint_every else
                                                " (checkpoint-every is 0)"))
        raise FloatingPointError(f"{error}; {kept}") from None
    if not writes:  # when writing, on_epoch has appended them
        history = history + [with_bits_per_char(r) if language_model else r for r in new]
    _mark_chosen(history, selector, net, state, dataset, loss, config.precision)
    if writes:
        atomic_write(out_dir / "metrics.jsonl",
                     "".join(strict_dumps(r) + "\n" for r in history).encode())
        plot_curves(history, out_dir / "curves.png",
                    f"{config.model} on {config.dataset} ({config.activation})")
        has_state = bool(jax.tree.leaves(state.model_state))
        if has_state:
            save_params(out_dir / STATE_FILE, state.model_state)
        save_params(out_dir / PARAMS_FILE, state.params,
                    metadata=params_metadata(run_record(config, dataset, stats)))
        write_run_manifest(out_dir, [CONFIG_FILE, "metrics.jsonl", "curves.png",  # last: finished
                                     *([STATE_FILE] if has_state else []), PARAMS_FILE])
    return state, history, net, dataset


def _mark_chosen(history: list[dict], selector: EarlyStopping | None, net: Layer,
                 state: TrainState, dataset: datasets.Dataset, loss, precision: str) -> None:
    """Marks the record of the epoch the run kept ``"chosen": true``: with validation, the best
    epoch (``state`` is its), to which the test metrics are added, measured once; without, the
    last epoch, whose record has the test metrics of every epoch (not used to choose)."""
    if selector is None or selector.best_epoch is None:  # no finite validation: the last epoch
        history[-1]["chosen"] = True
        return
    record = next(r for r in history if r["epoch"] == selector.best_epoch)
    test = evaluate(net, state.params, (dataset.x_test, dataset.y_test),
                    model_state=state.model_state, loss=loss, precision=precision)
    record.update(chosen=True, **{f"test_{name}": value for name, value in test.items()})
    if "train_bits_per_char" in record:  # a language model's
        with_bits_per_char(record)


def _run_writer(out_dir: Path, config: RunConfig, history: list[dict],
                language_model: bool = False, selector: EarlyStopping | None = None,
                sharded: bool = False, writes: bool = True):
    """``on_epoch`` for ``fit``: appends to ``history`` and (``writes``: the main process)
    ``metrics.jsonl``, checkpoints (with ``selector``, the best epoch's state too: a
    :class:`RunState`; ``sharded``: through Orbax, every process saving its shards,
    :mod:`jaxnet.sharded_checkpoint`)."""
    save = save_sharded if sharded else save_checkpoint
    metrics_file = out_dir / "metrics.jsonl"

    def on_epoch(record, state):
        record = with_bits_per_char(dict(record)) if language_model else record
        saves = config.checkpoint_every and record["epoch"] % config.checkpoint_every == 0
        if saves:  # a diverged state (after a finite loss) is neither logged nor checkpointed
            check_finite(state, f"epoch {record['epoch']}: not checkpointed")
        history.append(record)
        if writes:
            with metrics_file.open("a") as f:
                f.write(strict_dumps(record) + "\n")  # NaN/inf as null: strict JSON
        if saves:
            if selector is not None:  # fit calls on_epoch after the selector saw the epoch
                state = RunState(*state, state if selector.best_state is None
                                 else selector.best_state)
            save(out_dir / "checkpoints", state, keep=config.keep_checkpoints,
                 metadata={"epoch": record["epoch"], "config": config.to_json(),
                           "history": history})

    return on_epoch


def _restore_run(checkpoints: Path, template: TrainState | RunState, config: RunConfig,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[TrainState | RunState, list[dict]]:
    """The state and history of the latest checkpoint; ``(template, [])`` when there is none.
    With ``mesh``: of the latest sharded checkpoint, restored onto ``mesh`` by jaxnet's rules."""
    if mesh is None:
        check_checkpoints(checkpoints)  # a damaged newest one would block its step's save
        found, restore = list_checkpoints(checkpoints), restore_checkpoint
    else:  # an interrupted Orbax save is never listed
        found = list_sharded(checkpoints)
        restore = lambda path, template: restore_sharded(path, template, mesh)  # noqa: E731
    if not found:
        return template, []
    checkpoint = found[-1]
    try:
        state, manifest = restore(checkpoint, template)
    except CheckpointError as error:
        if len(found) == 1:
            raise
        raise CheckpointError(f"{error}; to resume from the previous checkpoint instead, remove "
                              f"{checkpoint}") from None
    metadata = manifest["metadata"]
    if _saved_config(metadata.get("config")) != config:
        raise CheckpointError(f"{checkpoint}: written by a run with another config than "
                              f"{checkpoints.parent / 'config.json'}")
    history = metadata.get("history")
    if not (isinstance(history, list) and len(history) == metadata.get("epoch")):
        raise CheckpointError(f"{checkpoint}: the manifest's metadata lacks the run's history")
    return state, history


def _saved_config(values) -> RunConfig | None:
    """A config as saved by an earlier version too (options added since take their defaults)."""
    try:
        return RunConfig.from_dict(values)
    except (ValueError, TypeError):
        return None


def read_config(run_dir: Path) -> tuple[RunConfig, dict]:
    """The ``config.json`` of a run directory: ``(config, the whole record)``."""
    config_file = Path(run_dir) / "config.json"
    record = read_record(run_dir)
    try:
        config = RunConfig.from_dict(record["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_file}: not a valid jaxnet run config ({error})") from None
    return config, record


def _data_record(dataset: datasets.Dataset, stats: dict[str, float]) -> dict[str, Any]:
    return {"name": dataset.name, "num_classes": dataset.num_classes,
            "example_shape": list(dataset.x_train.shape[1:]),
            "train_examples": dataset.num_train, "test_examples": len(dataset.x_test), **stats}


def _check_same_data(out_dir: Path, dataset: datasets.Dataset, stats: dict[str, float]) -> None:
    """A resumed run must see the data it started with (as far as config.json records it)."""
    recorded = read_config(out_dir)[1]["data"]
    if recorded != _data_record(dataset, stats):
        raise ValueError(f"{out_dir / 'config.json'}: the data set changed since the run started "
                         f"(recorded {recorded}, now {_data_record(dataset, stats)})")


def write_config(out_dir: Path, config: RunConfig, dataset: datasets.Dataset,
                 stats: dict[str, float], mesh: jax.sharding.Mesh | None = None) -> None:
    record = run_record(config, dataset, stats)
    if mesh is not None:  # where it ran: devices, processes, platform (not part of the recipe)
        record["mesh"] = data_parallel.describe(mesh)
    atomic_write(out_dir / "config.json", strict_dumps(record, indent=2).encode())


def run_record(config: RunConfig, dataset: datasets.Dataset, stats: dict[str, float]) -> dict:
    """What ``config.json`` records: the config, the data (shape, classes, standardisation) and
    the versions."""
    return {
        "config": config.to_json(),
        "data": _data_record(dataset, stats),
        "versions": {"jaxnet": __version__, "jax": jax.__version__, "optax": optax.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def read_run(run_dir: Path) -> tuple[RunConfig, dict, Layer, dict]:
    """Reads a finished run directory back: ``(config, config.json record, network, params)``
    (:func:`jaxnet.load_run`, with the settings checked as a :class:`RunConfig`)."""
    run = load_run(run_dir)  # verifies the run's files first
    config, _ = read_config(run_dir)
    return config, run.config, run.net, run.params


def run_preprocess(data: dict, input_shape: tuple[int, ...], input_dtype) -> Preprocess:
    """The preprocessing a ``jaxnet train`` run applied (:func:`jaxnet.runs.preprocess_for`)."""
    return preprocess_for(data, input_shape, input_dtype)
