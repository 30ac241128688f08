"""Streaming from a memory-mapped file against the resident ``fit``, on the W1 MLP.

W1: MLP 784-512-512-10, Adam, float32, batch 128. :func:`compare` writes ``rows`` random
examples to ``.npy`` files, trains one warm-up epoch and then ``epochs`` epochs each way
(resident arrays; ``np.load(mmap_mode="r")`` streamed in chunks), and returns the examples per
second of each. Not run by the suite (the machine is shared); ``tests`` runs it tiny.

    python -m benchmarks.streaming [rows] [epochs]
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import jax
import numpy as np
import optax

import jaxnet as jn
from jaxnet import train
from jaxnet.train.streaming import fit_streaming
from benchmarks.workloads import W1


def w1_net(sizes=W1):
    layers = []
    for width in sizes[1:-1]:
        layers += [jn.Dense(width), jn.relu]
    return jn.serial(*layers, jn.Dense(sizes[-1]))


def compare(rows: int = 60_000, epochs: int = 2, batch_size: int = 128, sizes=W1,
            chunk_steps: int | None = None, directory: str | None = None) -> dict[str, float]:
    """``{"resident": examples/s, "streaming": examples/s, "ratio": streaming / resident}``,
    the median epoch after a warm-up epoch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], rows).astype(np.int32)
    net = w1_net(sizes)
    params = net.init(jax.random.key(0), x[:1])
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = pathlib.Path(tmp)
        np.save(path / "x.npy", x)
        np.save(path / "y.npy", y)
        mapped = (np.load(path / "x.npy", mmap_mode="r"), np.load(path / "y.npy", mmap_mode="r"))
        results = {}
        for name, data, options in (("resident", (x, y), {}),
                                    ("streaming", mapped, {"chunk_steps": chunk_steps})):
            run = train.fit if name == "resident" else fit_streaming
            _, history = run(net, params, optax.adam(1e-3), data, epochs=epochs + 1,
                             batch_size=batch_size, progress=False, **options)
            results[name] = float(np.median([r["examples_per_second"] for r in history[1:]]))
    results["ratio"] = results["streaming"] / results["resident"]
    return results


if __name__ == "__main__":
    print(compare(*map(int, sys.argv[1:3])))
