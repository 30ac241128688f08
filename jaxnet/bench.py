"""Benchmarks: jaxnet against a hand-written raw-JAX reference, side by side in one process.

Every workload's variants run in alternating order, several rounds; each entry reports the median,
min and max throughput, the ratio of its median to the reference's median, the achieved GFLOP/s
and its fraction of the float32 matmul rate measured at the start of the same run, and the time
to the first finished call (compilation included).

Workloads (see ``shared/PERFORMANCE.md`` for the peers measured on this machine):
  W1: MLP 784-512-512-10, Adam, float32, batch 128 (and 1024): train steps per second.
  W2: MLP 64-32-10, batch 32: the same, all per-step overhead.
  W3: forward pass of the W1 MLP on 8192 inputs: samples per second.
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
import numpy as np
import optax

from jaxnet.combinators import serial
from jaxnet.activations import relu
from jaxnet.inference import predict
from jaxnet.layers import Dense
from jaxnet.losses import softmax_cross_entropy
from jaxnet.tensorfile import atomic_write
from jaxnet.train import init_train_state, make_epoch, make_train_step


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


def measure(variants: list[Variant], units: int, rounds: int) -> dict[str, list[float]]:
    """Units per second of each variant, ``rounds`` times, rotating the order every round."""
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            start = time.perf_counter()
            v.run(units)
            rates[v.name].append(units / (time.perf_counter() - start))
    return rates


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 ``jnp.dot`` rate in FLOP/s on ``size x size`` matrices."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times)


# ---- the hand-written raw-JAX reference: what a careful user writes without a library ----------

def raw_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m), jnp.zeros((n,), jnp.float32))
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def raw_apply(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def raw_step(optimizer):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(raw_apply(p, x), y).mean())(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def mlp(sizes):
    layers = []
    for width in sizes[1:-1]:
        layers += [Dense(width), relu]
    return serial(*layers, Dense(sizes[-1]))


def train_variants(sizes, batch, steps_per_call) -> list[Variant]:
    """Raw-JAX step loop (reference), jaxnet step loop, jaxnet fit's device loop."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(key, (batch,), 0, sizes[-1])
    optimizer = optax.adam(1e-3)

    raw = {"params": raw_init(key, sizes)}
    raw["opt"] = optimizer.init(raw["params"])
    step = raw_step(optimizer)

    def run_raw(k):
        p, o = raw["params"], raw["opt"]
        for _ in range(k):
            p, o, _ = step(p, o, x, y)
        raw["params"], raw["opt"] = jax.block_until_ready((p, o))

    net = mlp(sizes)
    params = net.init(key, x[:1])
    jn = {"state": init_train_state(net, optimizer, params)}
    jn_step = make_train_step(net, optimizer)

    def run_step(k):
        s = jn["state"]
        for _ in range(k):
            s, _ = jn_step(s, x, y)
        jn["state"] = jax.block_until_ready(s)

    # fit's epoch program over a resident data set of steps_per_call batches
    xs = jax.random.normal(key, (batch * steps_per_call, sizes[0]), jnp.float32)
    ys = jax.random.randint(key, (batch * steps_per_call,), 0, sizes[-1])
    epoch_fn, _ = make_epoch(net, optimizer, softmax_cross_entropy, xs.shape[0], batch)
    epoch = jax.jit(epoch_fn, donate_argnums=0)
    fit = {"state": init_train_state(net, optimizer, jax.tree.map(jnp.copy, params)), "epoch": 0}

    def run_fit(k):
        s = fit["state"]
        for _ in range(max(k // steps_per_call, 1)):
            s, _ = epoch(s, xs, ys, jnp.int32(fit["epoch"]))
            fit["epoch"] += 1
        fit["state"] = jax.block_until_ready(s)

    return [Variant("raw-jax step (donated)", run_raw, time_first_call(lambda: run_raw(1))),
            Variant("jaxnet train step", run_step, time_first_call(lambda: run_step(1))),
            Variant("jaxnet fit (device loop)", run_fit,
                    time_first_call(lambda: run_fit(steps_per_call)))]


def inference_variants(sizes, n) -> list[Variant]:
    key = jax.random.key(0)
    x = jax.random.normal(key, (n, sizes[0]), jnp.float32)
    raw_params = raw_init(key, sizes)
    raw = jax.jit(raw_apply)
    net = mlp(sizes)
    params = net.init(key, x[:1])

    def run_raw(k):
        for _ in range(k):
            out = raw(raw_params, x)
        jax.block_until_ready(out)

    def run_predict(k):
        for _ in range(k):
            out = predict(net, params, x, batch_size=n)
        jax.block_until_ready(out)

    return [Variant("raw-jax jit apply", run_raw, time_first_call(lambda: run_raw(1))),
            Variant("jaxnet predict", run_predict, time_first_call(lambda: run_predict(1)))]


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
            "compile_seconds": v.compile_seconds,
        })
    return entries


def weights(sizes) -> int:
    return sum(m * n for m, n in zip(sizes[:-1], sizes[1:]))


def run_benchmarks(quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs every workload; returns ``{"matmul_gflops", "entries", "settings"}``."""
    rounds = 3 if quick else 7
    peak = matmul_rate()
    log(f"float32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    w1, w2 = (784, 512, 512, 10), (64, 32, 10)
    workloads = [
        ("W1 MLP 784-512-512-10 b128", w1, 128, 20 if quick else 50),
        ("W1 MLP 784-512-512-10 b1024", w1, 1024, 5 if quick else 10),
        ("W2 MLP 64-32-10 b32", w2, 32, 200 if quick else 1000),
    ]
    entries = []
    for name, sizes, batch, steps in workloads:
        log(f"{name}: {rounds} rounds of {steps} steps")
        variants = train_variants(sizes, batch, steps)
        rates = measure(variants, steps, rounds)
        entries += summarise(name, variants, rates, "steps/s", 6 * batch * weights(sizes), peak)
    n = 8192
    log(f"W3 forward of the W1 MLP on {n} inputs: {rounds} rounds")
    variants = inference_variants(w1, n)
    calls = 3 if quick else 10
    rates = measure(variants, calls, rounds)
    entries += summarise(f"W3 forward W1 MLP n{n}", variants,
                         {k: [r * n for r in v] for k, v in rates.items()},
                         "samples/s", 2 * weights(w1), peak)
    return {"matmul_gflops": peak / 1e9, "entries": entries,
            "settings": {"quick": quick, "rounds": rounds, "jax": jax.__version__,
                         "devices": [str(d) for d in jax.devices()]}}


def format_table(results: dict) -> str:
    """A markdown table of the entries."""
    lines = [f"float32 matmul rate: {results['matmul_gflops']:.1f} GFLOP/s", "",
             "| workload | variant | median | min | max | unit | ratio | GFLOP/s | of matmul | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["entries"]:
        lines.append(f"| {e['workload']} | {e['variant']} | {e['median']:,.0f} | {e['min']:,.0f} | "
                     f"{e['max']:,.0f} | {e['unit']} | {e['ratio']:.2f} | {e['gflops']:.1f} | "
                     f"{e['fraction_of_matmul']:.0%} | {e['compile_seconds']:.2f} |")
    return "\n".join(lines)


def write_json(results: dict, path) -> None:
    atomic_write(Path(path), json.dumps(results, indent=2).encode())
