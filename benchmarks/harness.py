"""The benchmarks' timing machinery: variants, side-by-side measurement, summaries and tables.

Every workload's variants (``benchmarks.workloads``, ``benchmarks.peers``,
``benchmarks.population``) run in alternating order, several rounds (:func:`measure`); each
entry (:func:`summarise`) reports the median, min and max throughput, the ratio of its median to
the reference's median, the achieved GFLOP/s and its fraction of the float32 matmul rate
measured at the start of the same run (:func:`matmul_rate`), and the time to the first finished
call (compilation included). ``benchmarks/run.py`` runs them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from jaxnet.tensorfile import atomic_write


@dataclasses.dataclass
class Variant:
    """A named way to run a workload: ``run(k)`` does ``k`` units of work and waits for them."""

    name: str
    run: Callable[[int], None]
    compile_seconds: float


def time_first_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def loop_variant(name: str, step: Callable[[object], object], state, units_per_call: int = 1
                 ) -> Variant:
    """A variant whose ``run(k)`` calls ``state = step(state)`` ``k // units_per_call`` times (at
    least once), then waits for ``state``; its compile time is that of the first such call."""
    box = [state]

    def run(k):
        s = box[0]
        for _ in range(max(k // units_per_call, 1)):
            s = step(s)
        box[0] = jax.block_until_ready(s)

    return Variant(name, run, time_first_call(lambda: run(units_per_call)))


def measure(variants: list[Variant], units: int, rounds: int) -> dict[str, list[float]]:
    """Units per second of each variant, ``rounds`` times, rotating the order every round."""
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            start = time.perf_counter()
            v.run(units)
            rates[v.name].append(units / (time.perf_counter() - start))
    return rates


def matmul_rate(size: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """Best ``jnp.dot`` rate in FLOP/s on ``size x size`` matrices of ``dtype`` (float32 or
    bfloat16), accumulated and returned in float32: for bfloat16 the product that
    ``precision="bf16"`` runs (a bfloat16 result is slower than float32 on XLA:CPU)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    jax.block_until_ready(dot(a, a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times)


def summarise(workload: str, variants: list[Variant], rates: dict[str, list[float]], unit: str,
              flops_per_unit: float, peak: float) -> list[dict]:
    reference = statistics.median(rates[variants[0].name])
    entries = []
    for v in variants:
        median = statistics.median(rates[v.name])
        entries.append({
            "workload": workload, "variant": v.name, "unit": unit,
            "median": median, "min": min(rates[v.name]), "max": max(rates[v.name]),
            "ratio": median / reference, "gflops": median * flops_per_unit / 1e9,
            "fraction_of_matmul": median * flops_per_unit / peak,
            "compile_seconds": v.compile_seconds, "lower_is_better": False,
        })
    return entries


def compile_entries(workload: str, variants: list[Variant], rebuild: Callable[[], list[Variant]],
                    repeats: int) -> list[dict]:
    """Time to the first finished call of each variant: the compile times recorded by
    ``variants`` and by ``repeats - 1`` calls of ``rebuild()``, each after ``jax.clear_caches()``
    so that every program is traced and compiled anew. The ratio is of times (lower is better);
    a device-loop variant's first call includes running its whole first loop."""
    times = {v.name: [v.compile_seconds] for v in variants}
    for _ in range(repeats - 1):
        jax.clear_caches()
        for v in rebuild():
            times[v.name].append(v.compile_seconds)
    reference = statistics.median(times[variants[0].name])
    return [{"workload": f"Compile {workload}", "variant": name, "unit": "s to first step",
             "median": statistics.median(t), "min": min(t), "max": max(t),
             "ratio": statistics.median(t) / reference, "gflops": None,
             "fraction_of_matmul": None, "compile_seconds": statistics.median(t),
             "lower_is_better": True}
            for name, t in times.items()]


def format_table(results: dict) -> str:
    """A markdown table of the entries."""
    lines = [f"float32 matmul rate: {results['matmul_gflops']:.1f} GFLOP/s", "",
             "| workload | variant | median | min | max | unit | ratio | GFLOP/s | of matmul | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["entries"]:
        number = "{:.2f}" if e.get("lower_is_better") else "{:,.0f}"
        median, low, high = (number.format(e[k]) for k in ("median", "min", "max"))
        gflops = "" if e["gflops"] is None else f"{e['gflops']:.1f}"
        fraction = "" if e["fraction_of_matmul"] is None else f"{e['fraction_of_matmul']:.0%}"
        lines.append(f"| {e['workload']} | {e['variant']} | {median} | {low} | {high} | {e['unit']} "
                     f"| {e['ratio']:.2f} | {gflops} | {fraction} | {e['compile_seconds']:.2f} |")
    notes = [f"- skipped {note['variant']} on {note['workload']}: {note['reason']}"
             for note in results.get("skipped", [])]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_json(results: dict, path) -> None:
    atomic_write(Path(path), json.dumps(results, indent=2).encode())
