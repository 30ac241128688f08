"""Helpers shared by the tests: a known classification problem, a compile counter, and child
processes forming a local JAX cluster."""

import contextlib
import os
import socket
import subprocess

import jax
import numpy as np


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block (``count[0]``)."""
    count = [0]

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def blobs(rng, n=200, classes=3, features=5):
    """Linearly separable-ish clusters: a known problem an MLP must learn."""
    centers = rng.normal(size=(classes, features)) * 3
    labels = rng.integers(0, classes, size=n)
    x = centers[labels] + rng.normal(size=(n, features))
    return x.astype(np.float32), labels.astype(np.int32)


# A bare environment for child processes: CPU only, no flags inherited from the caller.
CHILD_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("JAX", "XLA_"))} | {"JAX_PLATFORMS": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], env: dict, timeout: float = 300
                  ) -> list[tuple[int, str, str]]:
    """Runs ``commands`` side by side (e.g. the processes of one JAX cluster) and returns each
    one's ``(returncode, stdout, stderr)``; none is left running, even when one fails."""
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:  # never leave a process waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


# glibc's mallinfo2 and malloc through ctypes, for the subprocess probes of allocator settings
MALLINFO_PRELUDE = r"""
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
"""
