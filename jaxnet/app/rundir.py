"""Run and sweep directories as the ``jaxnet`` command guards them: one writer at a time, no
silent overwrite, strict JSON, leftover temporary files cleaned up.

- **Lock.** ``train``, ``train --resume`` and ``sweep`` hold an exclusive ``fcntl.flock`` on
  ``DIR/.lock`` for the whole run (the file holds the writer's pid). The operating system drops
  the lock when the process ends, killed or not, so a lock is never left stuck; the ``.lock``
  file itself stays (removing it would let two writers lock two different files).
- **Overwrite.** A new run or sweep goes only into a missing or empty directory (``.lock``
  aside); ``--force`` first removes the files of the old run or sweep of the same kind (only the
  names jaxnet writes; other files are kept).
- **Temporary files.** Atomic writes go through ``.NAME.XXXXXXXX.tmp`` next to ``NAME``
  (``tempfile.mkstemp``: eight characters of ``[a-z0-9_]``); a killed process can leave one
  behind. :func:`remove_leftovers` removes those of given names, and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path

from jaxnet import run_manifest

LOCK_FILE = ".lock"
RUN_FILES = run_manifest.RUN_FILES  # config.json, ..., params.safetensors, run_manifest.json
SWEEP_FILES = ("sweep.json", "metrics.jsonl", "results.json", "results.md", "curves.png")


class DirectoryError(Exception):
    """A run directory that cannot be used (locked, or holding something else); one line."""


def temp_pattern(name: str) -> re.Pattern:
    """The names of the temporary files an atomic write of ``name`` makes (``mkstemp``)."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_leftovers(directory: Path, names) -> list[Path]:
    """Removes the temporary files a killed atomic write of any of ``names`` left in
    ``directory``; returns them. Files of other names are never touched."""
    patterns = [temp_pattern(name) for name in names]
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in Path(directory).iterdir():
            if any(p.fullmatch(path.name) for p in patterns) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


class RunLock:
    """An exclusive lock on ``directory`` (created with its parents when missing).

    Raises:
      DirectoryError: another process holds it ("DIR is in use by another jaxnet process (pid N)").
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            pid = _holder(fd)
            os.close(fd)
            raise DirectoryError(f"{self.directory} is in use by another jaxnet process "
                                 f"(pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None
        return False


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote (it writes it just after locking: a short wait)."""
    import time

    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


def _contents(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_FILE)


def _kind(directory: Path) -> str | None:
    if (directory / "sweep.json").exists():
        return "sweep"
    if (directory / "config.json").exists():
        return "run"
    return None


def prepare_new(directory: Path, kind: str, force: bool) -> None:
    """Checks (under the lock) that a new ``kind`` ("run" or "sweep") may be written to
    ``directory``; with ``force``, removes the old one of the same kind first.

    Raises:
      DirectoryError: the directory holds the other kind, or anything at all without
        ``force``, or, with ``force``, files that are not an old run's or sweep's.
    """
    if directory.exists() and not directory.is_dir():
        raise DirectoryError(f"--out {directory}: not a directory")
    found = _contents(directory)
    if not found:
        return
    held = _kind(directory)
    command = "train" if kind == "run" else "sweep"
    if held is not None and held != kind:
        marker = "sweep.json" if held == "sweep" else "config.json"
        raise DirectoryError(f"--out {directory} holds a {held} ({marker}); jaxnet {command} "
                             f"writes a {kind} directory there only into an empty directory; "
                             "choose another --out")
    known = _known(directory, kind)
    foreign = [name for name in found if name not in known]
    if held == kind and not force:
        raise DirectoryError(f"{directory} already holds a {kind}; choose another --out, or pass "
                             f"--force to replace it")
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DirectoryError(f"--out {directory} is not empty and holds files that are not a "
                             f"jaxnet {kind}'s ({shown}); choose an empty or new directory")
    if not force:
        raise DirectoryError(f"--out {directory} holds part of a jaxnet {kind} "
                             f"({', '.join(found[:3])}); choose another --out, or pass --force "
                             "to replace it")
    for name in found:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _known(directory: Path, kind: str) -> set[str]:
    """The names in ``directory`` that a ``kind`` writes (``--force`` removes only these)."""
    names = set(RUN_FILES if kind == "run" else SWEEP_FILES)
    known = {n for n in _contents(directory)
             if n in names or any(temp_pattern(m).fullmatch(n) for m in names)}
    sub = "checkpoints" if kind == "run" else "best"
    path = directory / sub
    if path.is_dir() and not path.is_symlink():
        inside = _contents(path)
        if kind == "run":
            ok = all(re.fullmatch(r"\.?ckpt-\d+.*", n) for n in inside)
        else:
            ok = all(n in RUN_FILES or any(temp_pattern(m).fullmatch(n) for m in RUN_FILES)
                     for n in inside)
        if ok:
            known.add(sub)
    return known


def strict(value):
    """``value`` with every non-finite float (NaN, inf) as None, NumPy scalars as Python's."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_dumps(value, **kwargs) -> str:
    """``value`` as strict JSON (RFC 8259: no NaN or Infinity; they become ``null``)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def is_inside_run(path: Path) -> Path | None:
    """The run or sweep directory that ``path`` (a file to write) lies in, if any: the nearest
    directory above it holding a jaxnet ``config.json`` (with ``config`` and ``data``) or a
    ``sweep.json``."""
    for directory in Path(os.path.abspath(path)).parents:
        if (directory / "sweep.json").is_file():
            return directory
        config = directory / "config.json"
        try:
            if config.is_file() and config.stat().st_size < (1 << 20):
                record = json.loads(config.read_text())
                if isinstance(record, dict) and {"config", "data"} <= set(record):
                    return directory
        except (OSError, ValueError):
            continue
    return None
