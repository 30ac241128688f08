"""Params trees to and from safetensors files, with readable keys (``dense_1.w``); no pickle.

Also the durable-write primitives the run directory and checkpoints share: a file is written to a
temporary name, fsynced, renamed into place, and its directory fsynced, so that after a crash (or
a full disk) a reader sees either the old file or the complete new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy

from jaxnet.trees import named_leaves


def flatten_tree(tree) -> dict[str, np.ndarray]:
    """``{"dense_1": {"w": a}}`` as ``{"dense_1.w": a}`` (host NumPy arrays)."""
    return {name: np.asarray(leaf) for name, leaf in named_leaves(tree)}


def unflatten_tree(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of :func:`flatten_tree` for trees of nested dicts."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def fsync_directory(path: Path) -> None:
    """Makes the entries of directory ``path`` (a rename, a new or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` durably, all or nothing.

    The bytes go to a temporary file in the same directory, which is fsynced, renamed over
    ``path``, and then the directory is fsynced. On any error (a full disk) the temporary file is
    removed and an existing ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are ordinary files
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def save_params(path, params) -> None:
    """Saves a params tree as a safetensors file (atomically).

    Args:
      path: destination file, e.g. ``run/params.safetensors``.
      params: nested dicts of arrays.
    """
    atomic_write(Path(path), safetensors.numpy.save(flatten_tree(params)))


def load_params(path) -> dict:
    """Loads a params tree saved by :func:`save_params` as NumPy arrays (no code is run)."""
    try:
        return unflatten_tree(safetensors.numpy.load_file(str(path)))
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own errors for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
