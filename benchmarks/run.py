"""Runs jaxnet's benchmarks and writes ``benchmarks/results/<name>.json`` and ``.md``.

    python benchmarks/run.py              # full: ~10 minutes on 2 CPU cores
    python benchmarks/run.py --quick      # ~3 minutes

Run it on a quiet machine: every variant is measured side by side in one process, alternating,
and reported as median, min and max with ratios to the hand-written raw-JAX reference measured
in the same run (``benchmarks/harness.py``).
``main`` opts in to the host allocator setting first: ``jaxnet.keep_freed_host_memory()``.

Workloads (``benchmarks/workloads.py``):
  Matmul: the isolated float32 and bfloat16 x bfloat16 -> float32 products (2048^3 and W5's
      conv2 as a 25088x288x64 product), the limits of float32 and bfloat16 training.
  W1: MLP 784-512-512-10, Adam, float32, batch 128 (and 1024): train steps per second,
      beside the raw step under ``lax.scan`` over one batch repeated and over a shuffled epoch
      (``fit`` does the latter).
  W2: MLP 64-32-10, batch 32: the same, all per-step overhead.
  W3: forward pass of the W1 MLP on 8192 inputs: samples per second.
  W4: 16 W2 MLPs trained at once (``benchmarks/population.py``): steps of every member per
      second, against training them one after another.
  W5: CNN conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-dense(128)-relu-dense(10) on
      28x28x1, batch 128, Adam: train steps per second (raw JAX with ``lax`` convolutions and
      ``reduce_window`` max-pool as the reference; PyTorch eager when it is installed), and the
      forward pass on 8192 inputs.
  W6: causal transformer LM over bytes (4 pre-norm blocks, d_model 256, 4 heads, sequence 128,
      batch 32), Adam: train tokens per second (steps/s x 4096).
  W7: LSTM 256 over 28 steps of 28 features, batch 128, Dense(10), Adam: train steps per second.
  W6 and W7 (``benchmarks/sequences.py``) run PyTorch eager when it is installed, W6 also
  ``torch.compile`` unless ``--no-torch-compile``.
W1 (both batches) and W5 also train with bfloat16 products: jaxnet's ``precision="bf16"``, a
raw-JAX step on bfloat16 operands with float32 accumulation, and PyTorch eager float32 and
``torch.autocast`` bfloat16 when PyTorch is installed; their rows end in ``bf16``.
The peer libraries (``benchmarks/peers.py``) run on W1 at batch 128, W2 and W3 when installed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp

import jaxnet
from benchmarks import peers, population, sequences, workloads
from benchmarks.harness import (Variant, compile_entries, format_table, matmul_rate,
                                measure, summarise, write_json)
from jaxnet.models import cnn

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def mlp_train_variants(sizes, batch, steps_per_call, skipped: list[dict], *,
                       with_peers: bool = True, bf16: bool = False) -> list[Variant]:
    """``workloads.train_variants``, then with ``with_peers`` the peer libraries' train steps on
    the same batch, and with ``bf16`` the bfloat16 variants (``workloads.mlp_bf16_variants``,
    PyTorch eager and autocast); ``skipped`` collects notes on missing packages."""
    name = workloads.workload_name(sizes, batch)
    variants = workloads.train_variants(sizes, batch, steps_per_call)
    x, y = workloads.mlp_batch(sizes, batch)
    if with_peers:
        variants += peers.peer_train_variants(name, sizes, x, y, skipped)
    if bf16:
        variants += workloads.mlp_bf16_variants(sizes, batch, steps_per_call)
        variants += peers.torch_mlp_variants(name, sizes, x, y, skipped, eager=not with_peers)
    return variants


def _log_skipped(skipped: list[dict], start: int, log: Callable[[str], None]) -> None:
    for note in skipped[start:]:
        log(f"  skipped {note['variant']} on {note['workload']}: {note['reason']}")


def run_benchmarks(quick: bool = False, log: Callable[[str], None] = print, *,
                   torch_compile: bool = True) -> dict:
    """Runs every workload; returns ``{"matmul_gflops", "entries", "skipped", "settings"}``.
    ``torch_compile=False`` leaves out W6's ``torch.compile`` variant.

    The peer libraries (``benchmarks.peers``) run on W1 at batch 128, W2 and W3 when they are
    installed; ``skipped`` holds a note for each one that is not."""
    load_before = os.getloadavg()
    rounds = 3 if quick else 7
    peak = matmul_rate()
    log(f"float32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    entries, skipped = [], []
    for m, k, n in workloads.MATMUL_SHAPES:
        units = 3 if quick else 10
        log(f"Matmul {m}x{k}x{n}: {rounds} rounds of {units} products")
        variants = workloads.matmul_variants(m, k, n)
        entries += summarise(f"Matmul {m}x{k}x{n}", variants, measure(variants, units, rounds),
                             "products/s", 2 * m * k * n, peak)
    w1, w2 = workloads.W1, workloads.W2
    # (sizes, batch, steps, peers, bf16)
    mlps = [(w1, 128, 20 if quick else 200, True, True),
            (w1, 1024, 5 if quick else 10, False, True),
            (w2, 32, 200 if quick else 1000, True, False)]
    for sizes, batch, steps, with_peers, bf16 in mlps:
        name = workloads.workload_name(sizes, batch)
        log(f"{name}: {rounds} rounds of {steps} steps")
        noted = len(skipped)
        variants = mlp_train_variants(sizes, batch, steps, skipped, with_peers=with_peers, bf16=bf16)
        _log_skipped(skipped, noted, log)
        rates = measure(variants, steps, rounds)
        entries += summarise(name, variants, rates, "steps/s",
                             6 * batch * workloads.weights(sizes), peak)
        if (sizes, batch) == (w1, 128):
            log(f"Compile {name}: time to the first finished step, {2 if quick else 3} times")
            entries += compile_entries(
                name, variants, lambda: mlp_train_variants(sizes, batch, steps, [], bf16=bf16),
                2 if quick else 3)

    steps = 40 if quick else 200
    log(f"W4 population of 16 W2 MLPs: {rounds} rounds of {steps} steps of every member")
    variants = population.population_variants(16, steps)
    entries += summarise("W4 16x W2 MLP b32", variants, measure(variants, steps, rounds),
                         "steps/s (all 16)", population.flops_per_unit(16), peak)
    n, key = 8192, jax.random.key(0)
    log(f"W3 forward of the W1 MLP on {n} inputs: {rounds} rounds")
    x, noted = jax.random.normal(key, (n, w1[0]), jnp.float32), len(skipped)
    variants = (workloads.inference_variants(workloads.raw_apply, workloads.raw_init(key, w1),
                                             workloads.mlp(w1), x)
                + peers.peer_inference_variants(f"W3 forward W1 MLP n{n}", w1, x, skipped))
    _log_skipped(skipped, noted, log)
    entries += _forward_entries(f"W3 forward W1 MLP n{n}", variants, n, 2 * workloads.weights(w1),
                                quick, rounds, peak)

    steps = 3 if quick else 10
    log(f"W5 CNN b128: {rounds} rounds of {steps} steps")
    variants = (workloads.cnn_variants(128, steps, bf16=True)
                + peers.torch_cnn_variants(128, bf16=True))
    entries += summarise("W5 CNN b128", variants, measure(variants, steps, rounds), "steps/s",
                         3 * 128 * workloads.CNN_FLOPS_PER_EXAMPLE, peak)
    log(f"W5 CNN forward on {n} inputs: {rounds} rounds")
    variants = workloads.inference_variants(workloads.raw_cnn_apply, workloads.raw_cnn_init(key),
                                            cnn(10),
                                            jax.random.normal(key, (n, 28, 28, 1), jnp.float32))
    entries += _forward_entries(f"W5 forward CNN n{n}", variants, n,
                                workloads.CNN_FLOPS_PER_EXAMPLE, quick, rounds, peak)
    entries += _sequence_entries(quick, rounds, peak, skipped, torch_compile, log)
    return {"matmul_gflops": peak / 1e9, "entries": entries, "skipped": skipped,
            "settings": {"quick": quick, "rounds": rounds, "jax": jax.__version__,
                         "devices": [str(d) for d in jax.devices()],
                         "load_average_before": load_before, "load_average_after": os.getloadavg(),
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}}


def _sequence_entries(quick, rounds, peak, skipped, torch_compile, log) -> list[dict]:
    """W6 in tokens per second (steps/s times batch times length: a W6 step takes about a
    second, and the table prints whole numbers) and W7 in steps per second
    (``benchmarks/sequences.py``)."""
    w6, w7 = sequences.W6, sequences.W7
    workloads_ = (
        (w6, 2 if quick else 3, "tokens/s", w6.batch * w6.length,
         lambda steps, notes: sequences.transformer_variants(
             w6, steps, torch_compile=torch_compile, skipped=notes)),
        (w7, 5 if quick else 20, "steps/s", 1,
         lambda steps, notes: sequences.lstm_variants(w7, steps, skipped=notes)))
    entries = []
    for sizes, steps, unit, per_step, build in workloads_:
        name, noted = sequences.workload_name(sizes), len(skipped)
        log(f"{name}: {rounds} rounds of {steps} steps")
        variants = build(steps, skipped)
        _log_skipped(skipped, noted, log)
        rates = measure(variants, steps, rounds)
        rates = {k: [r * per_step for r in v] for k, v in rates.items()}
        entries += summarise(name, variants, rates, unit, sizes.flops_per_step() / per_step, peak)
    return entries


def _forward_entries(workload, variants, n, flops_per_example, quick, rounds, peak) -> list[dict]:
    rates = measure(variants, 2 if quick else 5, rounds)
    return summarise(workload, variants, {k: [r * n for r in v] for k, v in rates.items()},
                     "samples/s", flops_per_example, peak)


def main(argv: list[str] | None = None) -> None:
    jaxnet.keep_freed_host_memory()  # process-wide; helps the raw-JAX reference equally
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="latest", help="results file name (default %(default)s)")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="leave out W6's torch.compile variant (slow to compile on CPU)")
    args = parser.parse_args(argv)
    results = (run_benchmarks(quick=args.quick, torch_compile=False) if args.no_torch_compile
               else run_benchmarks(quick=args.quick))
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "date": datetime.date.today().isoformat()}
    write_json(results, RESULTS / f"{args.name}.json")
    command = ("python benchmarks/run.py" + (" --quick" if args.quick else "")
               + (" --no-torch-compile" if args.no_torch_compile else ""))
    (RESULTS / f"{args.name}.md").write_text(
        f"`{command}` on {results['machine']['date']}, {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, jax {results['settings']['jax']}\n\n{format_table(results)}\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
