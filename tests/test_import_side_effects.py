"""Importing jaxnet, or any of its modules, changes nothing process-wide.

A library import must leave the process as it found it: glibc's allocator settings (the
command opts in with ``jaxnet.keep_freed_host_memory()``; the library never does), matplotlib's
backend (``jaxnet.app.plots`` draws on ``Figure`` objects, without pyplot), the environment
(``XLA_FLAGS`` included), JAX's configuration, warning filters, NumPy's print options, and JAX's
backends (still unstarted, so that ``jax.distributed.initialize`` can follow the import).

Each check runs in a fresh interpreter: it records the state after importing jaxnet's
dependencies, imports ``jaxnet``, records again, imports every module of the package (the
command's own, ``jaxnet.app``, included last), and records once more.
"""

import json
import os
import subprocess
import sys

import pytest

from support import MALLINFO_PRELUDE

_SCRIPT = r"""
import ctypes, importlib, json, os, pkgutil, sys, warnings

""" + MALLINFO_PRELUDE + r"""

def malloc_behaviour():
    # glibc has no getter for mallopt's parameters; these probes observe them, and change none.
    info = libc.mallinfo2
    # M_MMAP_MAX, M_MMAP_THRESHOLD: by default a 100 MiB block (above glibc's largest dynamic
    # threshold, 32 MiB) is mmapped, and freeing it does not move the threshold.
    before = info().hblks
    block = libc.malloc(100 << 20)
    mmapped = info().hblks - before
    libc.free(block)
    # M_TOP_PAD: how far the heap grows when small blocks no longer fit (128 KiB by default).
    start, blocks, step = info().arena, [], 0
    while len(blocks) < 4096 and not step:
        blocks.append(libc.malloc(60 << 10))
        step = info().arena - start
    for block in reversed(blocks):
        libc.free(block)
    return {"100 MiB block mmapped": mmapped, "heap grows by >= 32 MiB": step >= (32 << 20)}


import jax, matplotlib, numpy, optax, rich, safetensors  # the dependencies: their state is theirs
from jax._src import xla_bridge

LINUX = sys.platform.startswith("linux")


def snapshot():
    return {
        "malloc": malloc_behaviour() if LINUX else None,
        # the raw value: reading rcParams["backend"] would resolve (and so set) the backend
        "matplotlib backend": repr(dict.__getitem__(matplotlib.rcParams, "backend")),
        "pyplot imported": "matplotlib.pyplot" in sys.modules,
        "environment": dict(os.environ),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "jax config": {name: repr(value) for name, value in jax.config.values.items()},
        "warning filters": [repr(f) for f in warnings.filters],
        "numpy print options": repr(numpy.get_printoptions()),
        "jax backends started": xla_bridge.backends_are_initialized(),
    }


states = {"dependencies": snapshot()}
import jaxnet
states["import jaxnet"] = snapshot()
names = sorted(m.name for m in pkgutil.walk_packages(jaxnet.__path__, "jaxnet."))
library = [n for n in names if n != "jaxnet.app" and not n.startswith("jaxnet.app.")]
for name in library:
    importlib.import_module(name)
states["every library module"] = snapshot()
for name in names:
    importlib.import_module(name)
states["jaxnet.app too"] = snapshot()
print(json.dumps({"states": states, "library": library, "matplotlib_backend": matplotlib.get_backend()}))
"""


def _run(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    if "mallinfo2" in done.stderr:
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _base_env() -> dict:
    # no JAXNET_* or MPLBACKEND from the caller; XLA_FLAGS set, to see it stays as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXNET_", "MPLBACKEND"))}
    return env | {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false", "JAX_PLATFORMS": "cpu"}


def _assert_unchanged(result: dict) -> None:
    states = result["states"]
    first = states["dependencies"]
    for stage, state in states.items():
        for key in first:
            was, now = first[key], state[key]
            if isinstance(was, dict) and isinstance(now, dict):  # name only what changed
                changed = {k for k in set(was) | set(now) if was.get(k) != now.get(k)}
                was, now = {k: was.get(k) for k in changed}, {k: now.get(k) for k in changed}
            assert was == now, f"after {stage}: {key} changed from {was!r} to {now!r}"


@pytest.fixture(scope="module")
def default_run():
    return _run(_base_env())


def test_import_changes_nothing_process_wide(default_run):
    assert len(default_run["library"]) > 20  # the walk found the package's modules
    assert "jaxnet.app.cli" not in default_run["library"]
    _assert_unchanged(default_run)
    first = default_run["states"]["dependencies"]
    assert first["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    assert first["pyplot imported"] is False and first["jax backends started"] is False
    if sys.platform.startswith("linux"):  # glibc's defaults, as the probes see them
        assert first["malloc"] == {"100 MiB block mmapped": 1, "heap grows by >= 32 MiB": False}


def test_import_keeps_a_chosen_matplotlib_backend():
    result = _run(_base_env() | {"MPLBACKEND": "svg"})
    _assert_unchanged(result)
    assert result["states"]["dependencies"]["matplotlib backend"] == "'svg'"
    assert result["matplotlib_backend"] == "svg"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_malloc_probes_see_keep_freed_host_memory():
    """The probes can fail: the opt-in changes what they observe."""
    script = _SCRIPT.replace("import jaxnet\n",
                             "import jaxnet\njaxnet.keep_freed_host_memory()\n", 1)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_base_env(), timeout=300)
    if "mallinfo2" in done.stderr:
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    assert done.returncode == 0, done.stderr
    states = json.loads(done.stdout)["states"]
    assert states["import jaxnet"]["malloc"] == {"100 MiB block mmapped": 0,
                                                 "heap grows by >= 32 MiB": True}
