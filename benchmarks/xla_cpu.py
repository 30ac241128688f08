"""Where XLA:CPU spends the time of jaxnet's MLP workloads, and which XLA settings change it.

    python benchmarks/xla_cpu.py                    # every part, ~10 minutes on 2 CPU cores
    python benchmarks/xla_cpu.py --part profile ops # some parts

Parts (findings in docs/performance.md, "Where the W1 step's time goes" and "XLA:CPU matmul"):
  profile  the W1 raw-JAX Adam step (MLP 784-512-512-10, batch 128) under ``jax.profiler``: the
           trace is read back with jaxlib's ProfileData and each executed HLO instruction (thunk)
           is grouped by kind (YNNPACK matmul, Eigen matmul, Adam update, ...) from the
           optimized HLO (``jit(f).lower(...).compile().as_text()``).
  ops      each matmul of that step compiled alone, under per-program XLA options.
  options  W1 step, W2 step (MLP 64-32-10, batch 32), W2 under ``lax.scan``, W3 forward and a
           2048x2048 ``jnp.dot``, each program compiled with per-program XLA options
           (``jax.jit(..., compiler_options=...)``), alternating in one process.
  shapes   the W1 step at batch 32 to 1024, and with weights stored (out, in) instead of (in, out).
  threads  process-wide settings, one child process each: XLA's thread pool size (``NPROC``),
           one core (CPU affinity), synchronous dispatch (``JAX_CPU_ENABLE_ASYNC_DISPATCH``).

Writes ``benchmarks/results/xla-cpu.json`` and ``.md`` (``--name`` to change). Every comparison is
side by side in one process (``threads``: alternating child processes), median of several rounds.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python benchmarks/xla_cpu.py`
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnet
from benchmarks.harness import Variant, loop_variant, matmul_rate, measure, write_json
from benchmarks.workloads import (raw_apply, raw_init, raw_scan_variant, raw_update, raw_variant,
                                  workload_name)

W1, W2 = (784, 512, 512, 10), (64, 32, 10)
# Per-program XLA options (``jax.jit(f, compiler_options=...)``). YNNPACK handles most dots by
# default in jaxlib 0.10.2; an empty fusion list sends every dot to Eigen instead.
OPTIONS = {
    "default": {},
    "Eigen dots (YNNPACK off)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "single-threaded Eigen": {"xla_cpu_multi_thread_eigen": False},
    "YNNPACK off, single-threaded Eigen": {"xla_cpu_experimental_ynn_fusion_type": "",
                                          "xla_cpu_multi_thread_eigen": False},
}


def batch_of(sizes, batch, seed=0):
    key = jax.random.key(seed)
    return (jax.random.normal(key, (batch, sizes[0]), jnp.float32),
            jax.random.randint(key, (batch,), 0, sizes[-1]))


def medians(variants, units, rounds) -> dict[str, dict]:
    rates = measure(variants, units, rounds)
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r)}
            for name, r in rates.items()}


def named(variant: Variant, name: str) -> Variant:
    return dataclasses.replace(variant, name=name)


# ---- reading the optimized HLO --------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")


def parse_hlo(text: str) -> dict[str, dict[str, dict]]:
    """``{computation: {instruction: {"shape", "op", "operands", "rest"}}}`` from HLO text."""
    computations, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault("ENTRY" if line.startswith("ENTRY") else header[1], {})
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, op, rest = match.groups()
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            current[name] = {"shape": tuple(int(d) for d in shape.split(",") if d), "op": op,
                             "operands": operands, "rest": rest}
    return computations


def dot_flops(instruction: dict, computation: dict) -> float:
    lhs = computation[instruction["operands"][0]]["shape"]
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction["rest"])[1]
    contracted = np.prod([lhs[int(d)] for d in dims.split(",") if d])
    return 2.0 * np.prod(instruction["shape"]) * contracted


def classify(hlo: str, param_shapes: set) -> dict[str, tuple[str, float]]:
    """Each ENTRY instruction that runs as a thunk -> (kind, FLOPs if it is a matmul)."""
    computations = parse_hlo(hlo)
    entry, kinds = computations["ENTRY"], {}
    for name, ins in entry.items():
        if ins["op"] == "dot":
            kinds[name] = ("matmul, Eigen", dot_flops(ins, entry))
        elif ins["op"] == "copy":
            kinds[name] = ("copy", 0.0)
        elif ins["op"] == "fusion":
            body = computations[re.search(r"calls=%([\w.\-]+)", ins["rest"])[1]]
            dots = [i for i in body.values() if i["op"] == "dot"]
            if "__ynn_fusion" in ins["rest"]:
                kinds[name] = (("matmul, YNNPACK", dot_flops(dots[0], body)) if dots
                               else ("reduction (bias gradient), YNNPACK", 0.0))
            elif ins["shape"] in param_shapes:
                kinds[name] = ("Adam update (elementwise)", 0.0)
            else:
                kinds[name] = ("loss, activations, bias (elementwise)", 0.0)
    return kinds


# ---- profile: thunk times inside the W1 step -------------------------------------------------------

def profile_step(options: dict, steps: int) -> dict:
    """Per-kind busy time per step of the W1 raw step, from a ``jax.profiler`` trace."""
    from jax._src.lib import _profile_data  # jaxlib's reader of the trace's XSpace protobuf

    key = jax.random.key(0)
    x, y = batch_of(W1, 128)
    params = raw_init(key, W1)
    optimizer = optax.adam(1e-3)
    step = jax.jit(lambda p, o, x, y: raw_update(optimizer, raw_apply, p, o, x, y),
                   donate_argnums=(0, 1), compiler_options=options)
    state = (params, optimizer.init(params))
    hlo = step.lower(*state, x, y).compile().as_text()
    kinds = classify(hlo, {tuple(a.shape) for a in jax.tree.leaves(params)})
    for _ in range(20):
        state = step(*state, x, y)[:2]
    jax.block_until_ready(state)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps // 10):  # chunks of 10 steps: the fastest chunk is the least disturbed
            start = time.perf_counter()
            for _ in range(10):
                state = step(*state, x, y)[:2]
            jax.block_until_ready(state)
            walls.append((time.perf_counter() - start) / 10)
        jax.profiler.stop_trace()
        trace = _profile_data.ProfileData.from_file(
            glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    durations = collections.defaultdict(list)  # instruction -> its durations in us
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kinds:
                    durations[event.name].append(event.duration_ns / 1e3)
    # the median duration of each instruction, robust to the other processes on the machine
    busy, calls, flops = collections.Counter(), collections.Counter(), collections.Counter()
    for name, times in durations.items():
        kind, f = kinds[name]
        per_step = len(times) / (steps // 10 * 10)
        busy[kind] += statistics.median(times) * per_step
        calls[kind] += per_step
        flops[kind] += f * per_step
    rows = [{"kind": k, "thunks_per_step": round(calls[k], 2), "busy_us_per_step": busy[k],
             "gflops_while_busy": flops[k] / busy[k] / 1e3 if flops[k] else None}
            for k in sorted(busy, key=busy.get, reverse=True)]
    return {"wall_us_per_step": min(walls) * 1e6, "busy_us_per_step": sum(busy.values()),
            "matmul_flops_per_step": sum(flops.values()), "kinds": rows}


def part_profile(quick: bool, log) -> dict:
    out = {}
    for label in ("default", "Eigen dots (YNNPACK off)"):
        log(f"profile: W1 step, {label}")
        out[label] = profile_step(OPTIONS[label], 50 if quick else 200)
    return out


# ---- ops: each matmul of the W1 step alone ------------------------------------------------------

def w1_matmuls(batch: int = 128):
    """(name, f, args, FLOPs) for the 8 matmuls of a W1 training step, written as JAX does, and
    the smallest weight gradient as it is for weights stored (out, in)."""
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (batch, 784))
    h, g, g10 = (jax.random.normal(k, (batch, n)) for k, n in zip(ks[1:4], (512, 512, 10)))
    w1, w2, w3 = (jax.random.normal(k, s) for k, s in zip(ks[3:], ((784, 512), (512, 512), (512, 10))))
    forward, backward, weight = (lambda a, w: a @ w), (lambda g, w: g @ w.T), (lambda a, g: a.T @ g)
    return [("forward x @ w1 (128x784 @ 784x512)", forward, (x, w1), 2 * batch * 784 * 512),
            ("forward h1 @ w2 (128x512 @ 512x512)", forward, (h, w2), 2 * batch * 512 * 512),
            ("forward h2 @ w3 (128x512 @ 512x10)", forward, (h, w3), 2 * batch * 512 * 10),
            ("input grad g3 @ w3.T (128x10 @ 10x512)", backward, (g10, w3), 2 * batch * 512 * 10),
            ("input grad g2 @ w2.T (128x512 @ 512x512)", backward, (g, w2), 2 * batch * 512 * 512),
            ("weight grad h2.T @ g3 (512x128 @ 128x10)", weight, (h, g10), 2 * batch * 512 * 10),
            # the same gradient for weights stored (out, in): a 10x512 output instead of 512x10
            ("weight grad g3.T @ h2 (10x128 @ 128x512)", weight, (g10, h), 2 * batch * 512 * 10),
            ("weight grad h1.T @ g2 (512x128 @ 128x512)", weight, (h, g), 2 * batch * 512 * 512),
            ("weight grad x.T @ g1 (784x128 @ 128x512)", weight, (x, g), 2 * batch * 784 * 512)]


def part_ops(quick: bool, log, peak: float) -> list[dict]:
    rounds, calls = (5, 20) if quick else (15, 40)
    rows = []
    for name, f, args, flops in w1_matmuls():
        log(f"ops: {name}")
        variants, kernels = [], {}
        for label, options in OPTIONS.items():
            fn = jax.jit(f, compiler_options=options)
            kernels[label] = ("YNNPACK" if "__ynn_fusion" in fn.lower(*args).compile().as_text()
                              else "Eigen")
            variants.append(loop_variant(label, lambda _, fn=fn: fn(*args), None))
        # the same call with no work: what dispatch alone costs for two arguments
        empty = jax.jit(lambda a, b: a[0, 0] + b[0, 0])
        variants.append(loop_variant("dispatch only", lambda _: empty(*args), None))
        result = medians(variants, calls, rounds)
        # the fastest round: the least disturbed by other processes on the machine
        dispatch_us = 1e6 / result.pop("dispatch only")["max"]
        for label, r in result.items():
            us, median_us = 1e6 / r["max"], 1e6 / r["median"]
            net = max(us - dispatch_us, 1e-3)
            rows.append({"op": name, "options": label, "kernel": kernels[label], "us_per_call": us,
                         "median_us_per_call": median_us, "dispatch_us": dispatch_us,
                         "gflops": flops / net / 1e3, "fraction_of_matmul": flops / net / 1e-6 / peak})
    return rows


# ---- options: per-program XLA options on whole workloads -------------------------------------

def part_options(quick: bool, log) -> list[dict]:
    rounds = 3 if quick else 15
    key = jax.random.key(0)
    rows = []

    def add(workload, variants, units, unit):
        log(f"options: {workload}")
        for label, r in medians(variants, units, rounds).items():
            rows.append({"workload": workload, "options": label, "unit": unit, **r})

    a = jax.random.normal(key, (2048, 2048))
    dots = [loop_variant(label, lambda _, d=jax.jit(jnp.dot, compiler_options=o): d(a, a), None)
            for label, o in OPTIONS.items()]
    add("jnp.dot 2048x2048", dots, 3, "calls/s")
    for sizes, batch, steps in ((W1, 128, 20), (W2, 32, 200 if quick else 400)):
        x, y = batch_of(sizes, batch)
        add(f"{workload_name(sizes, batch)} raw step (donated)",
            [named(raw_variant(raw_apply, raw_init(key, sizes), x, y,
                                     compiler_options=o), label) for label, o in OPTIONS.items()],
            steps, "steps/s")
    x, y = batch_of(W2, 32)
    add("W2 MLP 64-32-10 b32 raw lax.scan over 200 steps",
        [named(raw_scan_variant(raw_apply, raw_init(key, W2), x, y, 200, o), label)
         for label, o in OPTIONS.items()], 400, "steps/s")
    x = jax.random.normal(key, (8192, 784))
    params = raw_init(key, W1)
    forwards = [loop_variant(label, lambda _, f=jax.jit(raw_apply, compiler_options=o):
                                   f(params, x), None) for label, o in OPTIONS.items()]
    add("W3 forward W1 MLP n8192", forwards, 2, "calls/s")
    return rows


# ---- shapes: batch size and weight layout ------------------------------------------------------

def raw_apply_out_in(params, x):
    """The raw MLP with weights stored (out, in), as PyTorch stores them: ``x @ w.T``."""
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w.T + b)
    w, b = params[-1]
    return x @ w.T + b


def part_shapes(quick: bool, log) -> list[dict]:
    rounds = 3 if quick else 15
    key, rows = jax.random.key(0), []
    log("shapes: W1 step at batch 32 to 1024")
    variants = []
    for batch in (32, 64, 128, 256, 512, 1024):
        x, y = batch_of(W1, batch)
        v = raw_variant(raw_apply, raw_init(key, W1), x, y)
        # run(k) does k // batch steps: measure() then counts samples per second
        variants.append(Variant(f"batch {batch}", lambda k, v=v, b=batch: v.run(k // b),
                                      v.compile_seconds))
    for label, r in medians(variants, 6400 if quick else 12800, rounds).items():
        rows.append({"workload": "W1 raw step", "variant": label, "unit": "samples/s", **r})
    log("shapes: W1 step and W3 forward with weights (in, out) and (out, in)")
    x, y = batch_of(W1, 128)
    transposed = [(w.T, b) for w, b in raw_init(key, W1)]
    steps = [raw_variant(raw_apply, raw_init(key, W1), x, y),
             named(raw_variant(raw_apply_out_in, transposed, x, y), "raw-jax step, w (out, in)")]
    for label, r in medians(steps, 20, rounds).items():
        rows.append({"workload": "W1 MLP b128", "variant": label, "unit": "steps/s", **r})
    x = jax.random.normal(key, (8192, 784))
    params, params_t = raw_init(key, W1), [(w.T, b) for w, b in raw_init(key, W1)]
    f, f_t = jax.jit(raw_apply), jax.jit(raw_apply_out_in)
    forwards = [loop_variant("forward, w (in, out)", lambda _: f(params, x), None),
                loop_variant("forward, w (out, in)", lambda _: f_t(params_t, x), None)]
    for label, r in medians(forwards, 2, rounds).items():
        rows.append({"workload": "W3 forward n8192", "variant": label, "unit": "calls/s", **r})
    return rows


# ---- threads: process-wide settings, one child process each -----------------------------------

SETTINGS = {
    "default": {},
    "NPROC=1 (XLA thread pool of 1)": {"NPROC": "1"},
    "one core (CPU affinity {0})": {"AFFINITY": "0"},
    "synchronous dispatch": {"JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"},
    "NPROC=1, synchronous dispatch": {"NPROC": "1", "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"},
}


def cpu_idle(seconds: float = 2.0) -> float:
    """The fraction of all CPU time that was idle over the next ``seconds`` (Linux)."""
    def sample():
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(limit: float, log, threshold: float = 0.85) -> None:
    """Waits up to ``limit`` seconds for the machine to be ``threshold`` idle (other users)."""
    start, idle = time.monotonic(), 0.0
    while limit > 0 and time.monotonic() - start < limit:
        idle = cpu_idle()
        if idle >= threshold:
            break
    if limit > 0:
        log(f"  machine {idle:.0%} idle after waiting {time.monotonic() - start:.0f} s")


def child(quick: bool) -> None:
    """Measures a few workloads in this process and prints them as one JSON line."""
    key, rounds, out = jax.random.key(0), 3 if quick else 5, {}
    out["jnp.dot 2048 GFLOP/s"] = matmul_rate(repeats=5) / 1e9
    x, y = batch_of(W2, 32)
    w2 = [raw_variant(raw_apply, raw_init(key, W2), x, y),
          raw_scan_variant(raw_apply, raw_init(key, W2), x, y, 200)]
    for name, r in medians(w2, 1000, rounds).items():
        out[f"W2 {name} steps/s"] = r["median"]
    x, y = batch_of(W1, 128)
    w1 = [raw_variant(raw_apply, raw_init(key, W1), x, y)]
    out["W1 raw-jax step (donated) steps/s"] = medians(w1, 20 if quick else 50, rounds)[w1[0].name]["median"]
    print(json.dumps(out))


def part_threads(quick: bool, log, wait: float = 0) -> list[dict]:
    repeats, samples = 2 if quick else 3, collections.defaultdict(lambda: collections.defaultdict(list))
    labels = list(SETTINGS)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            log(f"threads: {label} (round {r + 1} of {repeats})")
            wait_for_quiet(wait, log)
            env = {**os.environ, **SETTINGS[label]}
            command = [sys.executable, __file__, "--child"] + (["--quick"] if quick else [])
            line = subprocess.run(command, env=env, check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
            for key, value in json.loads(line).items():
                samples[key][label].append(value)
    return [{"measure": key, "setting": label, "median": statistics.median(v), "min": min(v),
             "max": max(v)} for key, by_label in samples.items() for label, v in by_label.items()]


# ---- output ---------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    out = [f"`python benchmarks/xla_cpu.py` on {results['date']}, jax {results['jax']}, "
           f"{os.cpu_count()} CPU cores, load average {results['load_average_before']} before and "
           f"{results['load_average_after']} after; float32 `jnp.dot` 2048 rate "
           f"{results['matmul_gflops']:.1f} GFLOP/s", ""]
    for label, p in results.get("profile", {}).items():
        out += [f"### Profile of the W1 step ({label}): {p['wall_us_per_step']:.0f} us per step "
                f"(traced), thunks busy {p['busy_us_per_step']:.0f} us per step on 2 threads", "",
                "| kind | thunks per step | busy us per step | share | GFLOP/s while busy |",
                "|---|---|---|---|---|"]
        for k in p["kinds"]:
            rate = "" if k["gflops_while_busy"] is None else f"{k['gflops_while_busy']:.1f}"
            out.append(f"| {k['kind']} | {k['thunks_per_step']:g} | {k['busy_us_per_step']:.0f} | "
                       f"{k['busy_us_per_step'] / p['busy_us_per_step']:.0%} | {rate} |")
        out.append("")
    if "ops" in results:
        out += ["### Each W1 matmul alone (fastest round; GFLOP/s with dispatch subtracted)", "",
                "| op | options | kernel | us per call | median us | dispatch us | GFLOP/s | of matmul |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['op']} | {r['options']} | {r['kernel']} | {r['us_per_call']:.0f} | "
                f"{r['median_us_per_call']:.0f} | {r['dispatch_us']:.0f} | {r['gflops']:.1f} | "
                f"{r['fraction_of_matmul']:.0%} |"
                for r in results["ops"]] + [""]
    for part, column in (("options", "options"), ("shapes", "variant"), ("threads", "setting")):
        if part in results:
            first = "measure" if part == "threads" else "workload"
            out += [f"### {part}", "",
                    f"| {first} | {column} | median | min | max | ratio of medians | ratio of bests |",
                    "|---|---|---|---|---|---|---|"]
            reference = {}
            for r in results[part]:
                base = reference.setdefault(r[first], r)
                out.append(f"| {r[first]} | {r[column]} | {r['median']:,.1f} | {r['min']:,.1f} | "
                           f"{r['max']:,.1f} | {r['median'] / base['median']:.2f} | "
                           f"{r['max'] / base['max']:.2f} |")
            out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("profile", "ops", "options", "shapes", "threads")
    parser.add_argument("--part", nargs="+", choices=parts, default=list(parts))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="xla-cpu", help="results file name (default %(default)s)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each part (and each child process), wait up to SECONDS for "
                             "the machine to be 85%% idle: for a machine shared with others")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    jaxnet.keep_freed_host_memory()  # as run.py does; each child process applies it too
    if "AFFINITY" in os.environ:
        os.sched_setaffinity(0, {int(c) for c in os.environ["AFFINITY"].split(",")})
    if args.child:
        return child(args.quick)
    log = lambda line: print(line, flush=True)
    results = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "load_average_before": [round(v, 2) for v in os.getloadavg()],
               "matmul_gflops": matmul_rate() / 1e9}
    peak = results["matmul_gflops"] * 1e9
    for part in args.part:
        wait_for_quiet(args.wait_quiet, log)
        results[part] = (part_ops(args.quick, log, peak) if part == "ops"
                         else part_threads(args.quick, log, args.wait_quiet) if part == "threads"
                         else globals()[f"part_{part}"](args.quick, log))
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out = pathlib.Path(__file__).parent / "results"
    write_json(results, out / f"{args.name}.json")
    (out / f"{args.name}.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
