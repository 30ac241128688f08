"""Training on a memory-mapped array four times larger than the process's memory limit."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from support import CHILD_ENV

LIMIT = 512 * 2**20  # the child's memory limit; the file is four times larger
FEATURES, BLOCK = 1024, 8192  # float32 rows of 4 KiB, written a block of rows at a time
ROWS = 4 * LIMIT // (4 * FEATURES)

CHILD = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))  # before JAX allocates anything
    import jax, numpy as np, optax
    import jaxnet as jn
    x, y = np.load(sys.argv[1], mmap_mode="r"), np.load(sys.argv[2], mmap_mode="r")
    try:
        np.array(x)  # the whole array in memory: the limit must refuse it
        sys.exit("a copy of the whole array fitted under the limit")
    except MemoryError:
        pass
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(2))
    params = net.init(jax.random.key(0), np.asarray(x[:1]))
    state, history = jn.fit(net, params, optax.sgd(0.01), (x, y), epochs=1, batch_size=4096,
                            progress=False)
    # VmHWM: this process's peak resident memory. Not ru_maxrss: Linux carries it over from
    # the parent through fork and exec, so it would report pytest's own peak.
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024  # kB
    print(int(state.step), history[-1]["train_loss"], peak)
""")


def write_npy(path, rows: int) -> None:
    """A ``(rows, FEATURES)`` float32 .npy file written block by block with plain writes (no
    mapping: this process stays small as well)."""
    block = np.random.default_rng(0).standard_normal((BLOCK, FEATURES), dtype=np.float32)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (rows, FEATURES)})
        for _ in range(rows // BLOCK):
            f.write(block.tobytes())


@pytest.mark.slow
def test_training_on_a_memmap_four_times_the_memory_limit(tmp_path):
    """The limit is RLIMIT_DATA, set by the child on itself with ``resource.setrlimit``.

    RLIMIT_AS (``ulimit -v``) cannot express this test: it limits address space, and mapping
    the file takes address space as large as the file, so ``np.load(mmap_mode="r")`` of a file
    larger than the limit fails before training starts. RLIMIT_DATA (Linux 4.7 and later)
    limits private writable memory (the heap, anonymous mappings, XLA's buffers, thread
    stacks): what holding the data would take, while the shared read-only mapping of the file
    does not count. The child shows that the limit bites (a copy of the array raises
    MemoryError), trains one epoch over the whole file, and reports its peak resident memory
    (``VmHWM``, which counts the file's pages mapped in as well), which must stay below the
    limit, a quarter of the file. Measured: a peak of 424-456 MiB for the 2 GiB file.
    """
    x_path, y_path = tmp_path / "x.npy", tmp_path / "y.npy"
    try:
        write_npy(x_path, ROWS)
        np.save(y_path, (np.arange(ROWS) % 3 == 0).astype(np.int32))
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        result = subprocess.run([sys.executable, str(script), str(x_path), str(y_path),
                                 str(LIMIT)], env=CHILD_ENV | {"PYTHONPATH": os.getcwd()},
                                capture_output=True, text=True, timeout=300)
        size = x_path.stat().st_size
    finally:
        x_path.unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr[-3000:]
    steps, loss, peak = result.stdout.split()
    assert size >= 4 * LIMIT and int(steps) == ROWS // 4096 and np.isfinite(float(loss))
    assert int(peak) < size / 4, f"peak resident memory {int(peak) / 2**20:.0f} MiB"
