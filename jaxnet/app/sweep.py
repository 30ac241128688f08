"""A sweep: a grid of seeds and hyperparameters trained as one population (``jaxnet sweep``).

Every member is an ordinary :class:`~jaxnet.app.run.RunConfig` (the base config with its own seed,
learning rate, weight decay, dropout rate and init scale), so ``jaxnet train`` with that config
reproduces it. The sweep directory holds:

- ``sweep.json``: the base config, the grid, every member's config, the data and versions;
- ``metrics.jsonl``: one JSON object per epoch with a list per metric, one entry per member;
- ``results.json`` and ``results.md``: each setting's test accuracy over seeds (mean, std, min,
  max), every member's final metrics, the best member and the ensemble of all finite members;
- ``curves.png``: training loss and test accuracy of every member by epoch;
- ``best/``: the best member as a run directory (``config.json``, ``metrics.jsonl``,
  ``params.safetensors``) for ``jaxnet eval`` and ``jaxnet predict``.
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

from jaxnet import data as datasets
from jaxnet.population import Ensemble, Population, best_member, fit_population, init_population
from jaxnet.app.run import (RunConfig, build_model, build_optimizer, data_record, load_data,
                            run_record, write_config)
from jaxnet.app.plots import plot_population
from jaxnet.app.rundir import strict_dumps
from jaxnet.tensorfile import atomic_write, save_params
from jaxnet.train import evaluate

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
      The results (as written to ``results.json``): ``members``, ``settings``, ``best``,
      ``ensemble``, ``seconds``.
    """
    configs = sweep_configs(base, seeds, grid)
    dataset, stats = load_data(base)
    rates = [c.drop_rate for c in configs]
    net = build_model(dataclasses.replace(base, drop_rate=max(rates)), data_record(dataset, stats))
    steps_per_epoch = math.ceil(len(dataset.x_train) / min(base.batch_size, len(dataset.x_train)))
    optimizer = build_optimizer(base, steps_per_epoch, inject=True)
    population = init_population(
        net, optimizer, dataset.x_train[:1], seeds=[c.seed for c in configs],
        hyperparams={"learning_rate": [c.lr for c in configs],
                     "weight_decay": [c.weight_decay for c in configs]},
        drop_rate=rates if max(rates) > 0 else None, init_scale=[c.init_scale for c in configs])
    on_epoch = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_sweep_record(out_dir, base, seeds, grid, configs, dataset, stats)
        metrics = out_dir / "metrics.jsonl"
        atomic_write(metrics, b"")
        on_epoch = _appender(metrics)

    start = time.perf_counter()
    population, history = fit_population(
        net, population, optimizer, (dataset.x_train, dataset.y_train), epochs=base.epochs,
        batch_size=base.batch_size, eval_data=(dataset.x_test, dataset.y_test),
        shared_order=shared_order, progress=progress, on_epoch=on_epoch,
        precision=base.precision)
    seconds = time.perf_counter() - start
    ensemble = _ensemble(net, population, history, dataset, base.precision)
    results = summarize_sweep(configs, history, ensemble)
    results["seconds"] = seconds
    if out_dir is not None:
        _write_results(out_dir, base, configs, history, results, population, dataset, stats)
    return results


def _ensemble(net, population: Population, history: list[dict], dataset: datasets.Dataset,
              precision: str) -> dict[str, Any]:
    """Test metrics of the mean of the probabilities of every member whose test loss is finite."""
    finite = [i for i, v in enumerate(history[-1]["test_loss"]) if math.isfinite(v)]
    if not finite:
        return {"members": 0, "test_loss": math.nan, "test_accuracy": math.nan}
    params = jax.tree.map(lambda leaf: leaf[np.asarray(finite)], population.members.params)
    metrics = evaluate(Ensemble(net, len(finite)), params, (dataset.x_test, dataset.y_test),
                       precision=precision)
    return {"members": len(finite), "test_loss": metrics["loss"],
            "test_accuracy": metrics["accuracy"]}


def summarize_sweep(configs: list[RunConfig], history: list[dict],
                    ensemble: dict[str, Any]) -> dict[str, Any]:
    """Per-member final metrics, per-setting statistics over seeds, and the best member."""
    last = history[-1]
    test_accuracy = np.asarray([r["test_accuracy"] for r in history])  # (epochs, members)
    members = []
    for i, config in enumerate(configs):
        curve = np.where(np.isfinite(test_accuracy[:, i]), test_accuracy[:, i], -np.inf)
        members.append({"member": i, "seed": config.seed, **dict(zip(GRID, _setting(config))),
                        **{k: last[k][i] for k in ("train_loss", "train_accuracy", "test_loss",
                                                   "test_accuracy")},
                        "best_epoch": int(np.argmax(curve)) + 1,
                        "best_test_accuracy": float(test_accuracy[:, i].max())})
    settings = []
    for setting, group in itertools.groupby(members, key=lambda m: tuple(m[k] for k in GRID)):
        group = list(group)
        accuracy = np.asarray([m["test_accuracy"] for m in group])
        finite = accuracy[np.isfinite(np.asarray([m["test_loss"] for m in group]))]
        settings.append({**dict(zip(GRID, setting)), "seeds": len(group),
                         "diverged": len(group) - finite.size,
                         **_stats("test_accuracy", finite)})
    best = best_member(history)
    return {"members": members, "settings": settings, "best": members[best], "ensemble": ensemble}


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
    """Rows (header first) of the per-setting table: the ``axes`` hyperparameters and the test
    accuracy over seeds."""
    rows = [[*axes, "seeds", "test accuracy (mean ± std)", "min", "max", "diverged"]]
    for s in results["settings"]:
        rows.append([f"{s[k]:g}" for k in axes] + [
            str(s["seeds"]), f"{s['test_accuracy_mean']:.2%} ± {s['test_accuracy_std']:.2%}",
            f"{s['test_accuracy_min']:.2%}", f"{s['test_accuracy_max']:.2%}", str(s["diverged"])])
    return rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def _write_results(out_dir: Path, base: RunConfig, configs: list[RunConfig], history: list[dict],
                   results: dict, population: Population, dataset, stats) -> None:
    atomic_write(out_dir / "results.json", strict_dumps(results, indent=2).encode())
    best, ensemble = results["best"], results["ensemble"]
    member_rows = [["member", "seed", *GRID, "test accuracy", "test loss", "best epoch"]] + [
        [str(m["member"]), str(m["seed"]), *(f"{m[k]:g}" for k in GRID),
         f"{m['test_accuracy']:.2%}", f"{m['test_loss']:.4f}", str(m["best_epoch"])]
        for m in results["members"]]
    text = (f"# Sweep: {base.model} on {dataset.name}, {len(configs)} members, {base.epochs} "
            f"epochs\n\nTrained as one population in {results['seconds']:.1f} s.\n\n"
            f"## By setting (over seeds)\n\n{_markdown(format_settings(results))}\n"
            f"Best member: {best['member']} (seed {best['seed']}, "
            + ", ".join(f"{k} {best[k]:g}" for k in GRID)
            + f"): test accuracy {best['test_accuracy']:.2%}; its run directory is `best/`.\n\n"
            f"Ensemble of the {ensemble['members']} members with a finite loss (mean of "
            f"probabilities): test accuracy {ensemble['test_accuracy']:.2%}, test loss "
            f"{ensemble['test_loss']:.4f}.\n\n## Members\n\n{_markdown(member_rows)}")
    atomic_write(out_dir / "results.md", text.encode())
    labels = [", ".join(f"{k} {v:g}" for k, v in zip(GRID, _setting(c))
                        if len(set(getattr(m, k) for m in configs)) > 1) or "all" for c in configs]
    plot_population(history, labels, out_dir / "curves.png",
                    f"{base.model} on {dataset.name}: {len(configs)} members")
    _write_best(out_dir / "best", configs[best["member"]], history, best["member"], population,
                dataset, stats)


def _write_best(run_dir: Path, config: RunConfig, history: list[dict], index: int,
                population: Population, dataset, stats) -> None:
    """The best member as an ordinary run directory."""
    run_dir.mkdir(exist_ok=True)
    write_config(run_dir, config, dataset, stats)
    lines = [{k: v[index] if isinstance(v, list) else v for k, v in record.items()}
             for record in history]
    atomic_write(run_dir / "metrics.jsonl", "".join(strict_dumps(r) + "\n" for r in lines).encode())
    save_params(run_dir / "params.safetensors", population.member(index).params)
