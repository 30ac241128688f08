"""Shared checks of the adversarial tests: one-line errors and files unchanged on disk."""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from jaxnet.app.cli import main

FAST = ["--epochs", "2", "--hidden", "16", "--no-progress"]
CLI = [sys.executable, "-m", "jaxnet.app.cli"]


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), by relative path; the
    ``.lock`` file is left out: it holds the pid of its last holder, whoever that was."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_line_error(err: str, *names) -> str:
    """``err`` is exactly one ``jaxnet: error:`` line naming every one of ``names``."""
    assert err.startswith("jaxnet: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def refused(argv, capsys, *names) -> str:
    """``jaxnet ARGV`` exits 2 with one line naming ``names``."""
    assert main([str(a) for a in argv]) == 2
    return one_line_error(capsys.readouterr().err, *names)


def quiet_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("FORCE_COLOR", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES")}


@contextlib.contextmanager
def within(seconds: int):
    """Fails with ``TimeoutError`` instead of blocking for ever (an open of a FIFO that no one
    writes, say): SIGALRM interrupts the blocked system call."""
    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def bounded_cli(argv, memory: int = 3 << 30, timeout: int = 120) -> subprocess.CompletedProcess:
    """``jaxnet ARGV`` in a subprocess whose address space is capped at ``memory`` bytes, so
    that a read without a bound (of ``/dev/zero``) fails there instead of exhausting the
    machine. (The child caps itself: a ``preexec_fn`` would fork this threaded process.)"""
    start = ("import resource, runpy, sys; "
             f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory})); "
             "sys.argv[0] = 'jaxnet'; runpy.run_module('jaxnet.app.cli', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", start, *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=quiet_env())


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path
