"""Benchmarks: jaxnet against a hand-written raw-JAX reference, side by side in one process.

Every workload's variants run in alternating order, several rounds; each entry reports the median,
min and max throughput, the ratio of its median to the reference's median, the achieved GFLOP/s
and its fraction of the float32 matmul rate measured at the start of the same run, and the time
to the first finished call (compilation included).

Workloads (see ``shared/PERFORMANCE.md`` for the peers measured on this machine):
  W1: MLP 784-512-512-10, Adam, float32, batch 128 (and 1024): train steps per second.
  W2: MLP 64-32-10, batch 32: the same, all per-step overhead.
  W3: forward pass of the W1 MLP on 8192 inputs: samples per second.
  W5: CNN conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-dense(128)-relu-dense(10) on
      28x28x1, batch 128, Adam: train steps per second (raw JAX with ``lax`` convolutions and
      ``reduce_window`` max-pool as the reference; PyTorch eager when it is installed), and the
      forward pass on 8192 inputs.
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


def _raw_update(optimizer, apply, params, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean())(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def raw_variant(apply, params, x, y) -> Variant:
    """The reference: a hand-written Adam step, jitted with donated buffers, in a Python loop."""
    optimizer = optax.adam(1e-3)
    step = jax.jit(functools.partial(_raw_update, optimizer, apply), donate_argnums=(0, 1))
    raw = {"params": params, "opt": optimizer.init(params)}

    def run(k):
        p, o = raw["params"], raw["opt"]
        for _ in range(k):
            p, o, _ = step(p, o, x, y)
        raw["params"], raw["opt"] = jax.block_until_ready((p, o))

    return Variant("raw-jax step (donated)", run, time_first_call(lambda: run(1)))


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
    return ([raw_variant(raw_apply, raw_init(key, sizes), x, y)]
            + jaxnet_train_variants(mlp(sizes), x, y, steps_per_call))


def jaxnet_train_variants(net, x, y, steps_per_call) -> list[Variant]:
    """jaxnet's train step in a Python loop, and fit's epoch program over resident data."""
    key = jax.random.key(0)
    batch = x.shape[0]
    optimizer = optax.adam(1e-3)
    params = net.init(key, x[:1])
    jn = {"state": init_train_state(net, optimizer, params)}
    jn_step = make_train_step(net, optimizer)

    def run_step(k):
        s = jn["state"]
        for _ in range(k):
            s, _ = jn_step(s, x, y)
        jn["state"] = jax.block_until_ready(s)

    # fit's epoch program over a resident data set of steps_per_call batches
    xs = jnp.concatenate([x] * steps_per_call)
    ys = jnp.concatenate([y] * steps_per_call)
    epoch_fn, _ = make_epoch(net, optimizer, softmax_cross_entropy, xs.shape[0], batch)
    epoch = jax.jit(epoch_fn, donate_argnums=0)
    fit = {"state": init_train_state(net, optimizer, jax.tree.map(jnp.copy, params)), "epoch": 0}

    def run_fit(k):
        s = fit["state"]
        for _ in range(max(k // steps_per_call, 1)):
            s, _ = epoch(s, xs, ys, jnp.int32(fit["epoch"]))
            fit["epoch"] += 1
        fit["state"] = jax.block_until_ready(s)

    return [Variant("jaxnet train step", run_step, time_first_call(lambda: run_step(1))),
            Variant("jaxnet fit (device loop)", run_fit,
                    time_first_call(lambda: run_fit(steps_per_call)))]


def inference_variants(raw_apply_fn, raw_params, net, x) -> list[Variant]:
    """A hand-written jitted forward pass (reference) against ``jaxnet.predict`` on ``x``."""
    raw = jax.jit(raw_apply_fn)
    params = net.init(jax.random.key(0), x[:1])

    def run_raw(k):
        for _ in range(k):
            out = raw(raw_params, x)
        jax.block_until_ready(out)

    def run_predict(k):
        for _ in range(k):
            out = predict(net, params, x, batch_size=x.shape[0])
        jax.block_until_ready(out)

    return [Variant("raw-jax jit apply", run_raw, time_first_call(lambda: run_raw(1))),
            Variant("jaxnet predict", run_predict, time_first_call(lambda: run_predict(1)))]


CNN_FLOPS_PER_EXAMPLE = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 3136 * 128 + 128 * 10)


def raw_cnn_init(key):
    k = jax.random.split(key, 4)
    scale = lambda fan_in: 1 / np.sqrt(fan_in)
    return {"c1": (jax.random.normal(k[0], (3, 3, 1, 32)) * scale(9), jnp.zeros(32)),
            "c2": (jax.random.normal(k[1], (3, 3, 32, 64)) * scale(288), jnp.zeros(64)),
            "d1": (jax.random.normal(k[2], (3136, 128)) * scale(3136), jnp.zeros(128)),
            "d2": (jax.random.normal(k[3], (128, 10)) * scale(128), jnp.zeros(10))}


def raw_cnn_apply(params, x):
    """The CNN written directly with ``lax``: what the issue's raw-JAX figures measured."""
    def conv(x, wb):
        return jax.lax.conv_general_dilated(x, wb[0], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + wb[1]

    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    x = pool(jax.nn.relu(conv(x, params["c1"])))
    x = pool(jax.nn.relu(conv(x, params["c2"])))
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["d1"][0] + params["d1"][1])
    return x @ params["d2"][0] + params["d2"][1]


def torch_cnn_variants(batch: int) -> list[Variant]:
    """PyTorch eager (fused Adam) on the same CNN, when PyTorch is installed."""
    try:
        import torch
    except ImportError:
        return []
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(3136, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def run(k):
        for _ in range(k):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    return [Variant(f"pytorch {torch.__version__} eager, fused adam", run,
                    time_first_call(lambda: run(1)))]


def cnn_variants(batch: int, steps_per_call: int) -> list[Variant]:
    from jaxnet.models import cnn

    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(key, (batch,), 0, 10)
    return ([raw_variant(raw_cnn_apply, raw_cnn_init(key), x, y)]
            + jaxnet_train_variants(cnn(10), x, y, steps_per_call)
            + torch_cnn_variants(batch))


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
    n, key = 8192, jax.random.key(0)
    log(f"W3 forward of the W1 MLP on {n} inputs: {rounds} rounds")
    variants = inference_variants(raw_apply, raw_init(key, w1), mlp(w1),
                                  jax.random.normal(key, (n, w1[0]), jnp.float32))
    entries += _forward_entries(f"W3 forward W1 MLP n{n}", variants, n, 2 * weights(w1), quick, rounds, peak)

    from jaxnet.models import cnn
    steps = 3 if quick else 10
    log(f"W5 CNN b128: {rounds} rounds of {steps} steps")
    variants = cnn_variants(128, steps)
    entries += summarise("W5 CNN b128", variants, measure(variants, steps, rounds), "steps/s",
                         3 * 128 * CNN_FLOPS_PER_EXAMPLE, peak)
    log(f"W5 CNN forward on {n} inputs: {rounds} rounds")
    variants = inference_variants(raw_cnn_apply, raw_cnn_init(key), cnn(10),
                                  jax.random.normal(key, (n, 28, 28, 1), jnp.float32))
    entries += _forward_entries(f"W5 forward CNN n{n}", variants, n, CNN_FLOPS_PER_EXAMPLE, quick, rounds, peak)
    return {"matmul_gflops": peak / 1e9, "entries": entries,
            "settings": {"quick": quick, "rounds": rounds, "jax": jax.__version__,
                         "devices": [str(d) for d in jax.devices()]}}


def _forward_entries(workload, variants, n, flops_per_example, quick, rounds, peak) -> list[dict]:
    rates = measure(variants, 2 if quick else 5, rounds)
    return summarise(workload, variants, {k: [r * n for r in v] for k, v in rates.items()},
                     "samples/s", flops_per_example, peak)


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
