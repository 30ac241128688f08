"""Accelerator throughput: the device's matmul rate, then MLP training in float32 and bfloat16.

First the rate of one large ``jnp.dot`` in each dtype (``benchmarks.harness.matmul_rate``, the best of
several repeats, measured ``rounds`` times alternating the dtypes). Then, for each width and
batch size, an MLP ``width -> width (x layers, ReLU) -> 10`` trained with Adam by ``fit``'s
compiled epoch program (``jaxnet.train.make_epoch``: a ``lax.scan`` over resident batches, so
that the host's dispatch does not bound small steps on a fast device), once with
``precision="f32"`` and once with ``precision="bf16"`` (float32 params, gradients, optimizer
state and loss; bfloat16 matrix products). The two variants alternate, several rounds; each
reports the median, min and max steps per second.

FLOPs of one training step are counted as ``6 * batch * weights``: a dense layer's forward pass
is ``2 * batch * in * out`` multiply-adds, its backward pass about twice that (the input
gradient and the weight gradient); biases, activations, the loss and Adam's update are left
out, and the first layer's input gradient, which is not computed, is counted, so the figure is
the usual slight over-estimate. Achieved TFLOP/s are reported as a fraction of the best matmul
rate of the same dtype measured in the same run.

    python benchmarks/accelerator.py            # accelerator sizes: widths 1024-8192
    python benchmarks/accelerator.py --quick    # CPU sizes: widths 256-1024, a few minutes

Writes ``benchmarks/results/accelerator-<platform>.json`` and ``.md`` (platform: cpu, gpu, tpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import shlex
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python benchmarks/accelerator.py`
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import optax

from benchmarks.harness import Variant, matmul_rate, measure, time_first_call, write_json
from jaxnet.nn.combinators import serial
from jaxnet.nn.activations import relu
from jaxnet.nn.basic import Dense
from jaxnet.losses import softmax_cross_entropy
from jaxnet.tensorfile import atomic_write
from jaxnet.train import init_train_state, make_epoch
from jaxnet import keep_freed_host_memory

PRECISIONS = ("f32", "bf16")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MAX_RESIDENT_VALUES = 2 ** 28  # inputs held on the device per variant: 1 GiB of float32


@dataclasses.dataclass(frozen=True)
class Settings:
    widths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    batches: tuple[int, ...] = (256, 1024, 4096)
    layers: int = 3  # hidden layers of width x width
    classes: int = 10
    steps_per_call: int = 20  # steps in one compiled epoch (fewer when the inputs would be big)
    rounds: int = 5
    matmul_size: int = 8192
    matmul_repeats: int = 10
    quick: bool = False


QUICK = Settings(widths=(256, 512, 1024), batches=(64, 256), steps_per_call=10, rounds=3,
                 matmul_size=2048, matmul_repeats=5, quick=True)


def parse_settings() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", "--small", action="store_true",
                        help="CPU sizes: widths 256-1024, batches 64 and 256, 3 rounds")
    parser.add_argument("--widths", help="comma-separated widths, e.g. 1024,2048")
    parser.add_argument("--batches", help="comma-separated batch sizes, e.g. 256,1024")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    parse = lambda text: tuple(int(v) for v in text.split(","))
    overrides = {"widths": args.widths and parse(args.widths),
                 "batches": args.batches and parse(args.batches), "rounds": args.rounds}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v})


def weight_count(width: int, layers: int, classes: int) -> int:
    """Weights (biases left out) of ``width -> width (x layers) -> classes``."""
    return layers * width * width + width * classes


def train_step_flops(batch: int, weights: int) -> int:
    """``6 * batch * weights``: forward 2, backward 4 (input and weight gradients)."""
    return 6 * batch * weights


def matmul_rates(settings: Settings, log) -> dict[str, list[float]]:
    """FLOP/s of a ``matmul_size`` square ``jnp.dot`` per dtype, ``rounds`` times, alternating."""
    rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(settings.rounds):
        for precision in PRECISIONS[r % 2:] + PRECISIONS[:r % 2]:
            rates[precision].append(matmul_rate(settings.matmul_size, settings.matmul_repeats,
                                                DTYPES[precision]))
    for precision in PRECISIONS:
        log(f"matmul {settings.matmul_size}x{settings.matmul_size} {precision}: best "
            f"{max(rates[precision]) / 1e12:.3g} TFLOP/s")
    return rates


def fit_variant(net, precision: str, x, y, batch: int) -> Variant:
    """``fit``'s compiled epoch over ``x`` (``steps = len(x) // batch`` steps), donated state;
    ``run(k)`` runs ``k // steps`` epochs (at least one)."""
    optimizer = optax.adam(1e-3)
    params = net.init(jax.random.key(0), x[:1])
    steps = x.shape[0] // batch
    epoch_fn, _ = make_epoch(net, optimizer, softmax_cross_entropy, x.shape[0], batch,
                             precision=precision)
    epoch = jax.jit(epoch_fn, donate_argnums=0)
    box = {"state": init_train_state(net, optimizer, params), "epoch": 0}

    def run(k):
        state = box["state"]
        for _ in range(max(k // steps, 1)):
            state, _ = epoch(state, x, y, jnp.int32(box["epoch"]))
            box["epoch"] += 1
        box["state"] = jax.block_until_ready(state)

    return Variant(precision, run, time_first_call(lambda: run(steps)))


def train_entries(settings: Settings, width: int, batch: int, peaks: dict[str, float]) -> list[dict]:
    steps = max(2, min(settings.steps_per_call, MAX_RESIDENT_VALUES // (batch * width)))
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (steps * batch, width), jnp.float32)
    y = jax.random.randint(key_y, (steps * batch,), 0, settings.classes)
    net = serial(*[layer for _ in range(settings.layers) for layer in (Dense(width), relu)],
                 Dense(settings.classes))
    variants = [fit_variant(net, precision, x, y, batch) for precision in PRECISIONS]
    rates = measure(variants, steps, settings.rounds)
    flops = train_step_flops(batch, weight_count(width, settings.layers, settings.classes))
    entries = []
    for v in variants:
        median = statistics.median(rates[v.name])
        entries.append({
            "width": width, "batch": batch, "precision": v.name, "steps_per_call": steps,
            "weights": weight_count(width, settings.layers, settings.classes),
            "flops_per_step": flops, "steps_per_second": {
                "median": median, "min": min(rates[v.name]), "max": max(rates[v.name])},
            "tflops": {"median": median * flops / 1e12, "min": min(rates[v.name]) * flops / 1e12,
                       "max": max(rates[v.name]) * flops / 1e12},
            "fraction_of_matmul": median * flops / peaks[v.name],
            "compile_seconds": v.compile_seconds,
        })
    f32, bf16 = (e["steps_per_second"]["median"] for e in entries)
    for e in entries:
        e["bf16_speedup"] = bf16 / f32
    return entries


def device_record() -> dict:
    device = jax.devices()[0]
    return {"platform": jax.default_backend(), "device_kind": device.device_kind,
            "devices": len(jax.devices()), "jax": jax.__version__,
            "host": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
            "date": datetime.date.today().isoformat()}


def run(settings: Settings, log=print) -> dict:
    results = {"device": device_record(), "settings": dataclasses.asdict(settings)}
    log(f"device: {results['device']['device_kind']} ({results['device']['platform']})")
    rates = matmul_rates(settings, log)
    peaks = {p: max(r) for p, r in rates.items()}
    results["matmul"] = {p: {"size": settings.matmul_size, "best_tflops": peaks[p] / 1e12,
                             "median_tflops": statistics.median(r) / 1e12,
                             "min_tflops": min(r) / 1e12} for p, r in rates.items()}
    results["entries"] = []
    for width in settings.widths:
        for batch in settings.batches:
            entries = train_entries(settings, width, batch, peaks)
            results["entries"] += entries
            log(f"width {width} batch {batch}: " + ", ".join(
                f"{e['precision']} {e['tflops']['median']:.3g} TFLOP/s "
                f"({e['fraction_of_matmul']:.0%} of matmul)" for e in entries))
    return results


def markdown(results: dict, command: str) -> str:
    device, settings = results["device"], results["settings"]
    lines = [
        f"`{command}` on {device['date']}: {device['device_kind']} ({device['platform']}, "
        f"{device['devices']} device(s)), host {device['host']} (load average "
        f"{', '.join(map(str, device['load_average_at_start']))} at start), jax {device['jax']}.", "",
        f"MLP `width -> width (x{settings['layers']}, ReLU) -> {settings['classes']}`, Adam, "
        "trained by `fit`'s compiled epoch (`make_epoch`, a `lax.scan` over resident batches). "
        "`bf16` is `precision=\"bf16\"`: float32 params, gradients, optimizer state and loss, "
        "bfloat16 matrix products. FLOPs per step = 6 x batch x weights (forward 2, backward 4; "
        "biases, activations and the optimizer left out). 'of matmul' divides the median TFLOP/s "
        "by the best square `jnp.dot` rate of the same dtype measured in the same run. Median "
        f"(min-max) over {settings['rounds']} rounds, the two precisions alternating.", "",
        "| matmul | size | best TFLOP/s | median | min |", "|---|---|---|---|---|"]
    for precision, m in results["matmul"].items():
        lines.append(f"| {precision} | {m['size']} | {m['best_tflops']:.3g} | "
                     f"{m['median_tflops']:.3g} | {m['min_tflops']:.3g} |")
    lines += ["", "| width | batch | weights | precision | steps/s median (min-max) | TFLOP/s | "
              "of matmul | bf16 speed-up | first call s |", "|---|---|---|---|---|---|---|---|---|"]
    for e in results["entries"]:
        s = e["steps_per_second"]
        lines.append(f"| {e['width']} | {e['batch']} | {e['weights']:,} | {e['precision']} | "
                     f"{s['median']:,.1f} ({s['min']:,.1f}-{s['max']:,.1f}) | "
                     f"{e['tflops']['median']:.3g} | {e['fraction_of_matmul']:.0%} | "
                     f"{e['bf16_speedup']:.2f}x | {e['compile_seconds']:.2f} |")
    if device["platform"] == "cpu":
        lines += ["", "These are CPU figures. On a CPU with bfloat16 matrix units (AMX-BF16, "
                  "AVX512-BF16) XLA:CPU runs a plain-orientation bfloat16 x bfloat16 -> float32 "
                  "product on them; convolutions and transposed-operand products it upcasts to "
                  "float32 (docs/performance.md, findings 12-14). The goal for accelerators, "
                  "bf16 training at "
                  ">= 60% of the bf16 matmul rate at large widths on a GPU, has not been "
                  "measured: no GPU was available for this run. Measure it with "
                  "`python benchmarks/accelerator.py` on the GPU."]
    return "\n".join(lines) + "\n"


def main() -> None:
    keep_freed_host_memory()  # an explicit opt-in: `import jaxnet` leaves the allocator alone
    settings = parse_settings()
    script = os.path.relpath(sys.argv[0], RESULTS.parents[1])
    command = shlex.join(["python", script, *sys.argv[1:]])
    results = run(settings)
    results["command"] = command
    name = f"accelerator-{results['device']['platform']}"
    RESULTS.mkdir(exist_ok=True)
    write_json(results, RESULTS / f"{name}.json")
    text = markdown(results, command)
    atomic_write(RESULTS / f"{name}.md", text.encode())
    print(text)
    print(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main()
