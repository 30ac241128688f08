"""Benchmarks: jaxnet against a hand-written raw-JAX reference, side by side in one process.

Every workload's variants run in alternating order, several rounds; each entry reports the median,
min and max throughput, the ratio of its median to the reference's median, the achieved GFLOP/s
and its fraction of the float32 matmul rate measured at the start of the same run, and the time
to the first finished call (compilation included).

Workloads (see ``shared/PERFORMANCE.md`` for the peers measured on this machine):
  W1: MLP 784-512-512-10, Adam, float32, batch 128 (and 1024): train steps per second.
  W2: MLP 64-32-10, batch 32: the same, all per-step overhead.
  W3: forward pass of the W1 MLP on 8192 inputs: samples per second.
  W4: 16 W2 MLPs trained at once (``benchmarks.population``): steps of every member per
      second, against training them one after another.
  W5: CNN conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-dense(128)-relu-dense(10) on
      28x28x1, batch 128, Adam: train steps per second (raw JAX with ``lax`` convolutions and
      ``reduce_window`` max-pool as the reference; PyTorch eager when it is installed), and the
      forward pass on 8192 inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet._xla import options as xla_options
from jaxnet.nn.combinators import serial
from jaxnet.nn.activations import relu
from jaxnet.inference import predict
from jaxnet.nn.basic import Dense
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
    bfloat16: the output in the same dtype, accumulated as the backend does)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
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


def raw_variant(apply, params, x, y, *, donate: bool = True,
                compiler_options: dict | None = None) -> Variant:
    """The reference: a hand-written Adam step, jitted with donated buffers, in a Python loop
    (``donate=False``: the same without donation, the baseline of ``shared/PERFORMANCE.md``;
    ``compiler_options``: XLA options for this program, e.g. ``{"xla_cpu_multi_thread_eigen":
    False}``)."""
    optimizer = optax.adam(1e-3)
    step = jax.jit(functools.partial(_raw_update, optimizer, apply),
                   donate_argnums=(0, 1) if donate else (), compiler_options=compiler_options)
    name = "raw-jax step (donated)" if donate else "raw-jax step (no donation)"
    return loop_variant(name, lambda s: step(*s, x, y)[:2], (params, optimizer.init(params)))


def raw_scan_variant(apply, params, x, y, length: int, compiler_options: dict | None = None
                     ) -> Variant:
    """The raw Adam step under ``lax.scan`` over ``length`` resident batches in one jitted call."""
    optimizer = optax.adam(1e-3)
    update = functools.partial(_raw_update, optimizer, apply)

    def steps(params, opt_state, xs, ys):  # xs: (length, batch, ...), ys: (length, batch)
        def body(carry, batch):
            params, opt_state, loss = update(*carry, *batch)
            return (params, opt_state), loss
        return jax.lax.scan(body, (params, opt_state), (xs, ys))[0]

    scan = jax.jit(steps, donate_argnums=(0, 1), compiler_options=compiler_options)
    xs, ys = jnp.stack([x] * length), jnp.stack([y] * length)
    return loop_variant(f"raw-jax lax.scan over {length} steps", lambda s: scan(*s, xs, ys),
                        (params, optimizer.init(params)), units_per_call=length)


def mlp(sizes):
    layers = []
    for width in sizes[1:-1]:
        layers += [Dense(width), relu]
    return serial(*layers, Dense(sizes[-1]))


def train_variants(sizes, batch, steps_per_call, peers: list[dict] | None = None) -> list[Variant]:
    """Raw-JAX step loop (the reference, first), the same without donation and under
    ``lax.scan`` (over ``min(200, steps_per_call)`` steps), jaxnet's step loop and fit's device
    loop; with ``peers`` (a list that collects notes on missing packages), the peer libraries."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(key, (batch,), 0, sizes[-1])
    variants = [raw_variant(raw_apply, raw_init(key, sizes), x, y),
                raw_variant(raw_apply, raw_init(key, sizes), x, y, donate=False),
                raw_scan_variant(raw_apply, raw_init(key, sizes), x, y, min(200, steps_per_call)),
                *jaxnet_train_variants(mlp(sizes), x, y, steps_per_call)]
    if peers is not None:
        from benchmarks.peers import peer_train_variants
        variants += peer_train_variants(_workload_name(sizes, batch), sizes, x, y, peers)
    return variants


def _workload_name(sizes, batch) -> str:
    return {(784, 512, 512, 10): "W1", (64, 32, 10): "W2"}.get(tuple(sizes), "MLP") + (
        f" MLP {'-'.join(map(str, sizes))} b{batch}")


def jaxnet_train_variants(net, x, y, steps_per_call) -> list[Variant]:
    """jaxnet's train step in a Python loop, and fit's epoch program over resident data."""
    key = jax.random.key(0)
    batch = x.shape[0]
    optimizer = optax.adam(1e-3)
    params = net.init(key, x[:1])
    jn_step = make_train_step(net, optimizer)  # donates its state: the step gets a copy
    step = loop_variant("jaxnet train step", lambda s: jn_step(s, x, y)[0],
                        init_train_state(net, optimizer, jax.tree.map(jnp.copy, params)))

    # fit's epoch program over a resident data set of steps_per_call batches
    xs = jnp.concatenate([x] * steps_per_call)
    ys = jnp.concatenate([y] * steps_per_call)
    epoch_fn, _ = make_epoch(net, optimizer, softmax_cross_entropy, xs.shape[0], batch)
    epoch = xla_options.jit(epoch_fn, donate_argnums=0)  # as fit compiles it

    def run_epoch(s):  # s: (TrainState, epoch number)
        return epoch(s[0], xs, ys, jnp.int32(s[1]))[0], s[1] + 1

    fit = loop_variant("jaxnet fit (device loop)", run_epoch,
                       (init_train_state(net, optimizer, params), 0),
                       units_per_call=steps_per_call)
    return [step, fit]


def inference_variants(raw_apply_fn, raw_params, net, x) -> list[Variant]:
    """A hand-written jitted forward pass (reference) against ``jaxnet.predict`` on ``x``."""
    raw = jax.jit(raw_apply_fn)
    params = net.init(jax.random.key(0), x[:1])
    return [loop_variant("raw-jax jit apply", lambda _: raw(raw_params, x), None),
            loop_variant("jaxnet predict",
                         lambda _: predict(net, params, x, batch_size=x.shape[0]), None)]


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
    from benchmarks.peers import torch_train_variant

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(3136, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return [torch_train_variant(model, np.random.default_rng(0).standard_normal(
        (batch, 1, 28, 28), np.float32), np.random.default_rng(1).integers(0, 10, batch))]


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


def weights(sizes) -> int:
    return sum(m * n for m, n in zip(sizes[:-1], sizes[1:]))


def _log_skipped(skipped: list[dict], start: int, log: Callable[[str], None]) -> None:
    for note in skipped[start:]:
        log(f"  skipped {note['variant']} on {note['workload']}: {note['reason']}")


def run_benchmarks(quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs every workload; returns ``{"matmul_gflops", "entries", "skipped", "settings"}``.

    The peer libraries (``benchmarks.peers``) run on W1 at batch 128, W2 and W3 when they are
    installed; ``skipped`` holds a note for each one that is not."""
    from benchmarks.peers import peer_inference_variants
    from jaxnet.models import cnn

    load_before = os.getloadavg()
    rounds = 3 if quick else 7
    peak = matmul_rate()
    log(f"float32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    w1, w2 = (784, 512, 512, 10), (64, 32, 10)
    workloads = [(w1, 128, 20 if quick else 200, True), (w1, 1024, 5 if quick else 10, False),
                 (w2, 32, 200 if quick else 1000, True)]
    entries, skipped = [], []
    for sizes, batch, steps, with_peers in workloads:
        name = _workload_name(sizes, batch)
        log(f"{name}: {rounds} rounds of {steps} steps")
        noted = len(skipped)
        variants = train_variants(sizes, batch, steps, skipped if with_peers else None)
        _log_skipped(skipped, noted, log)
        rates = measure(variants, steps, rounds)
        entries += summarise(name, variants, rates, "steps/s", 6 * batch * weights(sizes), peak)
        if (sizes, batch) == (w1, 128):
            log(f"Compile {name}: time to the first finished step, {2 if quick else 3} times")
            entries += compile_entries(
                name, variants, lambda: train_variants(sizes, batch, steps, []),
                2 if quick else 3)
    from benchmarks.population import flops_per_unit, population_variants

    steps = 40 if quick else 200
    log(f"W4 population of 16 W2 MLPs: {rounds} rounds of {steps} steps of every member")
    variants = population_variants(16, steps)
    entries += summarise("W4 16x W2 MLP b32", variants, measure(variants, steps, rounds),
                         "steps/s (all 16)", flops_per_unit(16), peak)
    n, key = 8192, jax.random.key(0)
    log(f"W3 forward of the W1 MLP on {n} inputs: {rounds} rounds")
    x, noted = jax.random.normal(key, (n, w1[0]), jnp.float32), len(skipped)
    variants = (inference_variants(raw_apply, raw_init(key, w1), mlp(w1), x)
                + peer_inference_variants(f"W3 forward W1 MLP n{n}", w1, x, skipped))
    _log_skipped(skipped, noted, log)
    entries += _forward_entries(f"W3 forward W1 MLP n{n}", variants, n, 2 * weights(w1), quick, rounds, peak)

    steps = 3 if quick else 10
    log(f"W5 CNN b128: {rounds} rounds of {steps} steps")
    variants = cnn_variants(128, steps)
    entries += summarise("W5 CNN b128", variants, measure(variants, steps, rounds), "steps/s",
                         3 * 128 * CNN_FLOPS_PER_EXAMPLE, peak)
    log(f"W5 CNN forward on {n} inputs: {rounds} rounds")
    variants = inference_variants(raw_cnn_apply, raw_cnn_init(key), cnn(10),
                                  jax.random.normal(key, (n, 28, 28, 1), jnp.float32))
    entries += _forward_entries(f"W5 forward CNN n{n}", variants, n, CNN_FLOPS_PER_EXAMPLE, quick, rounds, peak)
    return {"matmul_gflops": peak / 1e9, "entries": entries, "skipped": skipped,
            "settings": {"quick": quick, "rounds": rounds, "jax": jax.__version__,
                         "devices": [str(d) for d in jax.devices()],
                         "load_average_before": load_before, "load_average_after": os.getloadavg(),
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}}


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
