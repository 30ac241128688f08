import subprocess
import sys

import pytest

from support import MALLINFO_PRELUDE

from jaxnet import host_memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


@linux
def test_settings_take_effect_on_glibc():
    assert host_memory.keep_freed_host_memory({}) is True


def test_default_leaves_the_allocator_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: calls.append(name))
    assert host_memory.keep_freed_host_memory({host_memory.ENV_VAR: "default"}) is False
    assert calls == []


def test_a_c_library_without_mallopt_is_skipped(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: object())
    assert host_memory.keep_freed_host_memory({}) is False


_PROBE = """
import ctypes, sys
import jaxnet  # leaves the allocator alone
if sys.argv[1] == "cli":  # the command opts in, unless JAXNET_HOST_MALLOC=default
    from jaxnet.app.cli import main
    assert main(["eval", "/nonexistent/run"]) == 2  # opts in first, whatever the command does

""" + MALLINFO_PRELUDE + """before = libc.mallinfo2().hblks
blocks = [libc.malloc(20 << 20), libc.malloc(100 << 20)]  # mmapped by default, not when tuned
print(libc.mallinfo2().hblks - before)
for block in blocks:
    libc.free(block)
"""


@linux
@pytest.mark.parametrize("how, value, mmapped", [
    ("import", None, "2"),       # import jaxnet: glibc's defaults, large blocks mmapped
    ("cli", None, "0"),          # the jaxnet command: kept on the heap
    ("cli", "default", "2"),     # ... unless opted out
])
def test_the_command_keeps_large_blocks_on_the_heap_unless_opted_out(how, value, mmapped):
    env = {"PATH": "/usr/bin:/bin"} | ({} if value is None else {host_memory.ENV_VAR: value})
    out = subprocess.run([sys.executable, "-c", _PROBE, how], capture_output=True, text=True,
                         env=env, timeout=300)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mmapped
