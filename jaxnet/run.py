"""A training run from a config: data, model, optimizer, ``fit``, and the run directory.

A run directory holds ``config.json`` (everything needed to rerun it exactly),
``metrics.jsonl`` (one JSON object per epoch, written as the run goes), ``params.safetensors``
(the final parameters) and ``curves.png`` (loss and accuracy by epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxnet import data as datasets
from jaxnet import models
from jaxnet.core import Layer
from jaxnet.plots import plot_curves
from jaxnet.tensorfile import atomic_write, load_params, save_params
from jaxnet.train import TrainState, fit

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "rmsprop")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; saved as ``config.json``.

    The defaults train the classic network (a ReLU MLP with a softmax output) on digits.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    data: str | None = None  # the .npz file for dataset "npz"
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    drop_rate: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    standardize: bool = True

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        checks = [
            (self.model in ("mlp", "cnn"), f"model must be 'mlp' or 'cnn', got {self.model!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}"),
            (all(isinstance(h, int) and h > 0 for h in self.hidden), f"hidden sizes must be positive integers, got {self.hidden}"),
            (isinstance(self.epochs, int) and self.epochs > 0, f"epochs must be a positive integer, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size > 0, f"batch-size must be a positive integer, got {self.batch_size!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}"),
            (self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay!r}"),
            (0 <= self.drop_rate < 1, f"drop-rate must be in [0, 1), got {self.drop_rate!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config entries {unknown}")
        return cls(**values)


def load_data(config: RunConfig) -> tuple[datasets.Dataset, dict[str, float]]:
    """The config's data set, standardised with the training set's mean and std when asked.

    Returns:
      ``(dataset, stats)`` where ``stats = {"mean": m, "std": s}`` (0 and 1 when not standardised).
    """
    dataset = datasets.load_dataset(config.dataset, data_dir=config.data_dir, path=config.data)
    if not config.standardize:
        return dataset, {"mean": 0.0, "std": 1.0}
    x_train, x_test, stats = datasets.standardize(dataset.x_train, dataset.x_test)
    return dataset._replace(x_train=x_train, x_test=x_test), stats


def build_model(config: RunConfig, num_classes: int) -> Layer:
    if config.model == "cnn":
        return models.cnn(num_classes, config.activation, config.drop_rate)
    return models.mlp(config.hidden, num_classes, config.activation, config.drop_rate)


def build_optimizer(config: RunConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The config's optimizer; its learning rate decays to 0 over the run with ``cosine``."""
    lr = (optax.cosine_decay_schedule(config.lr, config.epochs * steps_per_epoch)
          if config.schedule == "cosine" else config.lr)
    wd = config.weight_decay
    make = {
        "adam": lambda: optax.adam(lr) if not wd else optax.chain(optax.add_decayed_weights(wd), optax.adam(lr)),
        "adamw": lambda: optax.adamw(lr, weight_decay=wd),
        "sgd": lambda: optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)),
        "momentum": lambda: optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9)),
        "rmsprop": lambda: optax.chain(optax.add_decayed_weights(wd), optax.rmsprop(lr)),
    }
    return make[config.optimizer]()


def train(config: RunConfig, out_dir: Path | None = None, progress: bool | None = None
          ) -> tuple[TrainState, list[dict], Layer, datasets.Dataset]:
    """Trains as ``config`` says; with ``out_dir``, writes the run directory as it goes.

    Returns:
      ``(state, history, network, dataset)``.
    """
    dataset, stats = load_data(config)
    net = build_model(config, dataset.num_classes)
    key = jax.random.key(config.seed)
    init_key, run_key = jax.random.split(key)
    params, model_state = net.init_with_state(init_key, dataset.x_train[:1])
    steps_per_epoch = math.ceil(len(dataset.x_train) / min(config.batch_size, len(dataset.x_train)))
    optimizer = build_optimizer(config, steps_per_epoch)
    on_epoch = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_config(out_dir, config, dataset, stats)
        metrics_file = out_dir / "metrics.jsonl"
        metrics_file.write_text("")

        def on_epoch(record, state):
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    state, history = fit(net, params, optimizer, (dataset.x_train, dataset.y_train),
                         epochs=config.epochs, batch_size=config.batch_size,
                         eval_data=(dataset.x_test, dataset.y_test), model_state=model_state,
                         key=run_key, progress=progress, on_epoch=on_epoch)
    if out_dir is not None:
        save_params(out_dir / "params.safetensors", state.params)
        plot_curves(history, out_dir / "curves.png",
                    f"{config.model} on {config.dataset} ({config.activation})")
    return state, history, net, dataset


def write_config(out_dir: Path, config: RunConfig, dataset: datasets.Dataset,
                 stats: dict[str, float]) -> None:
    record = {
        "config": dataclasses.asdict(config),
        "data": {"name": dataset.name, "num_classes": dataset.num_classes,
                 "example_shape": list(dataset.x_train.shape[1:]),
                 "train_examples": len(dataset.x_train), "test_examples": len(dataset.x_test),
                 **stats},
        "versions": {"jaxnet": _version(), "jax": jax.__version__, "optax": optax.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write(out_dir / "config.json", json.dumps(record, indent=2).encode())


def read_run(run_dir: Path) -> tuple[RunConfig, dict, Layer, dict]:
    """Reads a run directory back: ``(config, config.json record, network, params)``."""
    run_dir = Path(run_dir)
    config_file, params_file = run_dir / "config.json", run_dir / "params.safetensors"
    for f in (config_file, params_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; is {run_dir} a finished jaxnet run directory?")
    try:
        record = json.loads(config_file.read_text())
        config = RunConfig.from_dict(record["config"])
        num_classes = int(record["data"]["num_classes"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_file}: not a valid jaxnet run config ({error})") from None
    params = jax.tree.map(jnp.asarray, load_params(params_file))
    return config, record, build_model(config, num_classes), params


def _version() -> str:
    from jaxnet import __version__
    return __version__
