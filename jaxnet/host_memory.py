"""Host allocator settings that keep XLA:CPU's freed buffers mapped between calls.

Every call of a compiled program on XLA:CPU allocates its temporary and output buffers with
``malloc`` and frees them at the end. glibc returns large freed blocks to the operating system,
so the next call page-faults the same megabytes in again, a large share of a small program's
time (docs/performance.md, finding 4). Inside ``fit``'s ``lax.scan`` the buffers are reused
across steps, so only the first step of an epoch pays.

:func:`keep_freed_host_memory` raises glibc's trim threshold, top pad and mmap threshold and
turns off its per-block ``mmap`` so that freed blocks stay mapped and are reused. (Without the
last, blocks above 32 MiB, such as a large program's temporaries, are mapped and unmapped on
every call, and a small program run alternately with a bigger one page-faults again; finding 4.)
glibc still maps memory where its heaps cannot grow, so allocations do not fail for it. The
setting is process-wide: it speeds up every JAX program in the
process (a raw-JAX reference benchmarked alongside benefits equally) and keeps the process's
resident memory at its peak instead of shrinking after each call. So ``import jaxnet`` leaves
the allocator alone: the ``jaxnet`` command and the benchmarks call
:func:`keep_freed_host_memory` (``jaxnet.keep_freed_host_memory()``), and library users may call
it too, early in a program that runs many small XLA:CPU calls. The environment setting
``JAXNET_HOST_MALLOC=default`` makes it do nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "JAXNET_HOST_MALLOC"

# glibc's mallopt parameters (malloc.h) and the values jaxnet sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
SETTINGS = {_M_TRIM_THRESHOLD: 1 << 30,   # shrink the heap only above 1 GiB of free top memory
            _M_TOP_PAD: 64 << 20,         # grow it 64 MiB at a time
            _M_MMAP_THRESHOLD: 32 << 20,  # blocks up to 32 MiB (glibc's maximum) from the heap
            _M_MMAP_MAX: 0}               # larger blocks too (mmap only where the heap cannot)


def keep_freed_host_memory(environ=os.environ) -> bool:
    """Applies :data:`SETTINGS` with glibc's ``mallopt``; returns whether all of them took effect.

    Does nothing (returns ``False``) when ``environ[JAXNET_HOST_MALLOC] == "default"``, off Linux,
    or with a C library without a working ``mallopt`` (musl's accepts and ignores it).
    """
    if environ.get(ENV_VAR) == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = [mallopt(param, value) == 1 for param, value in SETTINGS.items()]  # every one
    return all(applied)
