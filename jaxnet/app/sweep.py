"""A sweep: a grid of seeds and hyperparameters trained as one population (``jaxnet sweep``).

Every member is an ordinary :class:`~jaxnet.app.run.RunConfig` (the base config with its own seed,
learning rate, weight decay, dropout rate and init scale), so ``jaxnet train`` with that config
reproduces it. The sweep directory holds:

- ``sweep.json``: the base config, the grid, every member's config, the data and versions;
- ``metrics.jsonl``: one JSON object per epoch with a list per metric, one entry per member;
- ``results.json`` and ``results.md``: each setting's validation accuracy over seeds (mean, std,
  min, max), every member's chosen epoch and its metrics, the best member and the ensemble of
  all finite members;
- ``curves.png``: training loss and validation accuracy of every member by epoch;
- ``best/``: the best member as a run directory (``config.json``, ``metrics.jsonl``,
  ``params.safetensors``) for ``jaxnet eval`` and ``jaxnet predict``.

Members are chosen on validation data, never on the test set: the base config's
``validation_split`` of the training rows is held out (the rows ``jaxnet train`` holds out), each
member keeps its epoch of the lowest validation loss, as ``jaxnet train`` does, and the best
member is the one whose kept epoch has the lowest validation loss
(:func:`jaxnet.population.best_member`). The test set then measures only the best member and
the ensemble, once, as the final report.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jax.numpy as jnp

from jaxnet import data as datasets
from jaxnet.population import (Ensemble, Population, best_member, chosen_epochs, fit_population,
                               init_population)
from jaxnet.app.run import (RunConfig, build_model, build_optimizer, data_record, load_data,
                            run_record, split_validation, write_config)
from jaxnet.app.plots import plot_population
from jaxnet.runs import params_metadata
from jaxnet.app.rundir import strict_dumps
from jaxnet.run_manifest import write_run_manifest
from jaxnet.tensorfile import atomic_write, save_params
from jaxnet.train import evaluate
from jaxnet.train.callbacks import VALIDATION, default_mode, improves

GRID = ("lr", "weight_decay", "drop_rate", "init_scale")  # RunConfig fields a sweep may vary


def sweep_configs(base: RunConfig, seeds: int, grid: dict[str, tuple[float, ...]]) -> list[RunConfig]:
    """The members: seeds ``base.seed, ..., base.seed + seeds - 1`` for every grid setting.

    Args:
      base: the config every member starts from.
      seeds: number of seeds per setting.
      grid: values to try for some of ``GRID``; the others keep ``base``'s value.

    Returns:
      One config per member, settings outermost, seeds innermost.
    """
    if base.dataset == "text":
        raise ValueError("a sweep trains classifiers; --dataset text is for jaxnet train")
    if not base.validation_split:
        raise ValueError("validation-split must be > 0 for a sweep: it chooses its members' "
                         "epochs and its best member on validation data, never on the test set")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    if unknown := sorted(set(grid) - set(GRID)):
        raise ValueError(f"a sweep varies only {', '.join(GRID)}; got {unknown}")
    axes = [grid.get(name) or (getattr(base, name),) for name in GRID]
    return [dataclasses.replace(base, seed=seed, **dict(zip(GRID, setting)))
            for setting in itertools.product(*axes)
            for seed in range(base.seed, base.seed + seeds)]


def _setting(config: RunConfig) -> tuple[float, ...]:
    return tuple(getattr(config, name) for name in GRID)


def _appender(path):
    """``on_epoch`` that appends each record to ``path`` as strict JSON (NaN/inf as null)."""
    def on_epoch(record, _):
        with path.open("a") as f:
            f.write(strict_dumps(record) + "\n")
    return on_epoch


class ChosenStates:
    """``on_epoch`` for ``fit_population`` that keeps each member's params and model state
    of its best epoch so far by ``monitor`` (per-member lists in the records), as
    :class:`jaxnet.train.callbacks.EarlyStopping` keeps a run's; the epochs are
    :func:`jaxnet.population.chosen_epochs`'s.

    Attributes:
      params, model_state: stacked on the member axis (``None`` before any finite epoch; a
        member without one keeps its first values, which nothing uses).
    """

    def __init__(self, monitor: str = VALIDATION):
        self.monitor, self.mode = monitor, default_mode(monitor)
        self.best: list[float | None] | None = None
        self.params = self.model_state = None

    def __call__(self, record: dict, population: Population) -> None:
        values = record[self.monitor]
        self.best = self.best or [None] * len(values)
        better = [improves([v], None if b is None else [b], [self.mode])
                  for v, b in zip(values, self.best)]
        self.best = [v if up else b for v, up, b in zip(values, better, self.best)]
        kept = (population.members.params, population.members.model_state)  # a copy to keep
        if self.params is not None:
            kept = _where_members(better, kept, (self.params, self.model_state))
        self.params, self.model_state = kept

    def member(self, index: int):
        """Member ``index``'s kept ``(params, model_state)``."""
        return jax.tree.map(lambda leaf: leaf[index], (self.params, self.model_state))


def sweep(base: RunConfig, seeds: int, grid: dict[str, tuple[float, ...]], out_dir: Path | None,
          *, shared_order: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Trains every member of the sweep at once and, with ``out_dir``, writes the sweep directory.

    Args:
      base, seeds, grid: as in :func:`sweep_configs`.
      out_dir: the sweep directory, or None to write nothing.
      shared_order: every member sees member 0's batches (faster); by default each member
        shuffles with its own seed, exactly as ``jaxnet train`` would.
      progress: show a progress bar (default: when stderr is a terminal).

    Returns:
      The results (as written to ``results.json``): ``members``, ``settings``, ``best`` (the
      only member with test metrics), ``ensemble``, ``seconds``.
    """
    configs = sweep_configs(base, seeds, grid)
    dataset, stats = load_data(base)
    dataset, validation = split_validation(dataset, base.validation_split)
    rates = [c.drop_rate for c in configs]
    net = build_model(dataclasses.replace(base, drop_rate=max(rates)), data_record(dataset, stats))
    steps_per_epoch = math.ceil(len(dataset.x_train) / min(base.batch_size, len(dataset.x_train)))
    optimizer = build_optimizer(base, steps_per_epoch, inject=True)
    population = _init_members(net, optimizer, configs, dataset, stats)
    chosen, write = ChosenStates(), None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_sweep_record(out_dir, base, seeds, grid, configs, dataset, stats)
        metrics = out_dir / "metrics.jsonl"
        atomic_write(metrics, b"")
        write = _appender(metrics)

    def on_epoch(record, population):
        chosen(record, population)
        if write is not None:
            write(record, population)

    start = time.perf_counter()
    population, history = fit_population(
        net, population, optimizer, (dataset.x_train, dataset.y_train), epochs=base.epochs,
        batch_size=base.batch_size, validation_data=validation, shared_order=shared_order,
        progress=progress, on_epoch=on_epoch, precision=base.precision)
    seconds = time.perf_counter() - start
    best = best_member(history)
    results = summarize_sweep(configs, history, _test(net, chosen, best, dataset, base.precision),
                              _ensemble(net, chosen, history, dataset, base.precision))
    results["seconds"] = seconds
    if out_dir is not None:
        _write_results(out_dir, base, configs, history, results, chosen, dataset, stats)
    return results


def _init_members(net, optimizer, configs: list[RunConfig], dataset: datasets.Dataset,
                  stats) -> Population:
    """The members at step 0, each as ``jaxnet train`` starts from its config. ``net`` has the
    largest dropout rate (each member's rate replaces it); members without dropout are
    initialised by the network built without Dropout layers, as ``jaxnet train`` builds theirs:
    its layers draw other initial keys."""
    rates = [c.drop_rate for c in configs]

    def members(net, drop_rate):
        return init_population(
            net, optimizer, dataset.x_train[:1], seeds=[c.seed for c in configs],
            hyperparams={"learning_rate": [c.lr for c in configs],
                         "weight_decay": [c.weight_decay for c in configs]},
            drop_rate=drop_rate, init_scale=[c.init_scale for c in configs])

    if max(rates) == 0:
        return members(net, None)
    population = members(net, rates)
    if min(rates) > 0:
        return population
    plain = members(build_model(dataclasses.replace(configs[0], drop_rate=0.0),
                                data_record(dataset, stats)), None).members
    return population._replace(members=_where_members([rate == 0 for rate in rates], plain,
                                                      population.members))


def _where_members(mask: list[bool], new, old):
    """``new``'s members where ``mask``, ``old``'s elsewhere (trees with a member axis)."""
    mask = jnp.asarray(mask)
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)),
                                               a, b), new, old)


def _test(net, chosen: ChosenStates, index: int, dataset: datasets.Dataset,
          precision: str) -> dict[str, float]:
    """Test metrics of member ``index`` at its chosen epoch: the sweep's one measurement of a
    member on the test set."""
    params, model_state = chosen.member(index)
    metrics = evaluate(net, params, (dataset.x_test, dataset.y_test), model_state=model_state,
                       precision=precision)
    return {f"test_{name}": value for name, value in metrics.items()}


def _ensemble(net, chosen: ChosenStates, history: list[dict], dataset: datasets.Dataset,
              precision: str) -> dict[str, Any]:
    """Test metrics of the mean of the probabilities of every member with a finite
    validation loss, each at its chosen epoch."""
    finite = [i for i, epoch in enumerate(chosen_epochs(history)) if epoch is not None]
    if not finite:
        return {"members": 0, "test_loss": math.nan, "test_accuracy": math.nan}
    params = jax.tree.map(lambda leaf: leaf[np.asarray(finite)], chosen.params)
    metrics = evaluate(Ensemble(net, len(finite)), params, (dataset.x_test, dataset.y_test),
                       precision=precision)
    return {"members": len(finite), "test_loss": metrics["loss"],
            "test_accuracy": metrics["accuracy"]}


def summarize_sweep(configs: list[RunConfig], history: list[dict], test: dict[str, float],
                    ensemble: dict[str, Any]) -> dict[str, Any]:
    """Each member's chosen epoch and its train and validation metrics, per-setting statistics
    of the validation accuracy over seeds, the best member (with ``test``, its test metrics)
    and the ensemble."""
    epochs = chosen_epochs(history)
    by_epoch = {record["epoch"]: record for record in history}
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    members = []
    for i, (config, epoch) in enumerate(zip(configs, epochs)):
        values = {k: math.nan if epoch is None else by_epoch[epoch][k][i] for k in keys}
        members.append({"member": i, "seed": config.seed, **dict(zip(GRID, _setting(config))),
                        "chosen_epoch": epoch, **values,
                        "diverged": not math.isfinite(history[-1]["val_loss"][i])})
    settings = []
    for setting, group in itertools.groupby(members, key=lambda m: tuple(m[k] for k in GRID)):
        group = list(group)
        accuracy = np.asarray([m["val_accuracy"] for m in group if m["chosen_epoch"]])
        settings.append({**dict(zip(GRID, setting)), "seeds": len(group),
                         "diverged": sum(m["diverged"] for m in group),
                         **_stats("val_accuracy", accuracy)})
    best = {**members[best_member(history)], **test}
    return {"members": members, "settings": settings, "best": best, "ensemble": ensemble}


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {f"{name}_{s}": math.nan for s in ("mean", "std", "min", "max")}
    return {f"{name}_mean": float(values.mean()), f"{name}_std": float(values.std()),
            f"{name}_min": float(values.min()), f"{name}_max": float(values.max())}


def _write_sweep_record(out_dir: Path, base: RunConfig, seeds: int, grid, configs, dataset,
                        stats) -> None:
    record = run_record(base, dataset, stats)  # the base, data and versions, as a run has
    record.update(seeds=seeds, grid={k: list(v) for k, v in grid.items()},
                  members=[c.to_json() for c in configs])
    atomic_write(out_dir / "sweep.json", strict_dumps(record, indent=2).encode())


def format_settings(results: dict[str, Any], axes: tuple[str, ...] = GRID) -> list[list[str]]:
    """Rows (header first) of the per-setting table: the ``axes`` hyperparameters and the
    validation accuracy of the members' chosen epochs over seeds."""
    rows = [[*axes, "seeds", "val accuracy (mean ± std)", "min", "max", "diverged"]]
    for s in results["settings"]:
        rows.append([f"{s[k]:g}" for k in axes] + [
            str(s["seeds"]), f"{s['val_accuracy_mean']:.2%} ± {s['val_accuracy_std']:.2%}",
            f"{s['val_accuracy_min']:.2%}", f"{s['val_accuracy_max']:.2%}", str(s["diverged"])])
    return rows


def describe_best(results: dict[str, Any]) -> str:
    """One sentence on the best member and the ensemble: how it was chosen, then its test
    metrics (the only test measurements of the sweep)."""
    best, ensemble = results["best"], results["ensemble"]
    return (f"Best member {best['member']} (seed {best['seed']}, "
            + ", ".join(f"{k} {best[k]:g}" for k in GRID)
            + f"), chosen by its validation loss {best['val_loss']:.4f} (accuracy "
            f"{best['val_accuracy']:.2%}) at epoch {best['chosen_epoch']}: test accuracy "
            f"{best['test_accuracy']:.2%}, test loss {best['test_loss']:.4f}; ensemble of the "
            f"{ensemble['members']} members with a finite validation loss (mean of "
            f"probabilities): test accuracy {ensemble['test_accuracy']:.2%}")


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def _write_results(out_dir: Path, base: RunConfig, configs: list[RunConfig], history: list[dict],
                   results: dict, chosen: ChosenStates, dataset, stats) -> None:
    atomic_write(out_dir / "results.json", strict_dumps(results, indent=2).encode())
    member_rows = [["member", "seed", *GRID, "chosen epoch", "val loss", "val accuracy"]] + [
        [str(m["member"]), str(m["seed"]), *(f"{m[k]:g}" for k in GRID), str(m["chosen_epoch"]),
         f"{m['val_loss']:.4f}", f"{m['val_accuracy']:.2%}"]
        for m in results["members"]]
    text = (f"# Sweep: {base.model} on {dataset.name}, {len(configs)} members, {base.epochs} "
            f"epochs\n\nTrained as one population in {results['seconds']:.1f} s. Each member "
            f"keeps its epoch of the lowest validation loss ({base.validation_split:g} of the "
            f"training set held out); the test set measures only the best member and the "
            f"ensemble.\n\n## By setting (over seeds)\n\n{_markdown(format_settings(results))}\n"
            f"{describe_best(results)}. Its run directory is `best/`.\n\n## Members\n\n{_markdown(member_rows)}")
    atomic_write(out_dir / "results.md", text.encode())
    labels = [", ".join(f"{k} {v:g}" for k, v in zip(GRID, _setting(c))
                        if len(set(getattr(m, k) for m in configs)) > 1) or "all" for c in configs]
    plot_population(history, labels, out_dir / "curves.png",
                    f"{base.model} on {dataset.name}: {len(configs)} members")
    _write_best(out_dir / "best", configs[results["best"]["member"]], history, results["best"],
                chosen, dataset, stats)


def _write_best(run_dir: Path, config: RunConfig, history: list[dict], best: dict,
                chosen: ChosenStates, dataset, stats) -> None:
    """The best member as an ordinary run directory, its chosen epoch's params and record
    marked as ``jaxnet train`` marks them."""
    run_dir.mkdir(exist_ok=True)
    write_config(run_dir, config, dataset, stats)
    index = best["member"]
    lines = [{k: v[index] if isinstance(v, list) else v for k, v in record.items()}
             for record in history]
    for record in lines:
        if record["epoch"] == best["chosen_epoch"]:
            record.update(chosen=True, test_loss=best["test_loss"],
                          test_accuracy=best["test_accuracy"])
    atomic_write(run_dir / "metrics.jsonl", "".join(strict_dumps(r) + "\n" for r in lines).encode())
    save_params(run_dir / "params.safetensors", chosen.member(index)[0],
                metadata=params_metadata(run_record(config, dataset, stats)))
    write_run_manifest(run_dir, ["config.json", "metrics.jsonl", "params.safetensors"])  # last
