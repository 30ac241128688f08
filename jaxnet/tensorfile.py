"""Params trees to and from safetensors files, with readable keys (``dense_1.w``); no pickle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy


def flatten_tree(tree) -> dict[str, np.ndarray]:
    """``{"dense_1": {"w": a}}`` as ``{"dense_1.w": a}`` (host NumPy arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def unflatten_tree(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of :func:`flatten_tree`."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
