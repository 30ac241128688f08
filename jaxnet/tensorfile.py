"""Params trees to and from safetensors files, with readable keys (``dense_1.w``); no pickle.

Also the durable-write primitives the run directory and checkpoints share: a file is written to a
temporary name, fsynced, renamed into place, and its directory fsynced, so that after a crash (or
a full disk) a reader sees either the old file or the complete new one, never a part. And the
bounded-read ones: a file is read only when it is a regular file (never a FIFO, which would block,
nor a device such as ``/dev/zero``, which never ends) and only as far as its size, checked first
against what its header or a manifest says, allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

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
    removed, an existing ``path`` is untouched, and the ``OSError`` names ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_directory(path.parent)
    except OSError as error:  # write, fsync and rename errors name no file
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def save_params(path, params, metadata: dict[str, str] | None = None) -> None:
    """Saves a params tree as a safetensors file (atomically).

    Args:
      path: destination file, e.g. ``run/params.safetensors``.
      params: nested dicts of arrays.
      metadata: strings for the header's ``__metadata__`` (read back by :func:`load_metadata`).
    """
    data = safetensors.numpy.save(flatten_tree(params), metadata=metadata)
    atomic_write(Path(path), _sorted_metadata(data) if metadata else data)


def _sorted_metadata(data: bytes) -> bytes:
    """``data``, a safetensors file, with its header's ``__metadata__`` keys in sorted order.
    safetensors writes them in hash order, which changes from process to process; equal params
    must give equal files (a resumed run's equal an uninterrupted one's, bit for bit)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data on 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def load_params(path) -> dict:
    """Loads a params tree saved by :func:`save_params` as NumPy arrays (no code is run).
    The file is read only after its header was checked against its size
    (:func:`read_safetensors`)."""
    data = read_safetensors(path)
    with _reading(path):
        return unflatten_tree(safetensors.numpy.load(data))


def load_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's header (``{}`` when it has none);
    the tensors are not read."""
    f, size = open_regular(path)
    with f:
        metadata = _safetensors_header(f, size, path)[0].get("__metadata__") or {}
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in metadata.items())):
        raise ValueError(f"{path}: not a readable safetensors file (__metadata__ must map "
                         "strings to strings)")
    return metadata


@contextlib.contextmanager
def _reading(path):
    """A damaged file as a ``ValueError`` naming ``path`` (safetensors raises its own errors);
    a missing one stays ``FileNotFoundError``."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


# --- bounded reads ------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100_000_000  # the largest safetensors header (safetensors' own limit)
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def open_regular(path) -> tuple[BinaryIO, int]:
    """``path`` opened for reading, and its size in bytes; refused unless it is a regular file
    (a symbolic link to one is followed).

    Opening does not block (a FIFO without a writer would wait forever) and reads nothing, so a
    FIFO, a device (``/dev/zero`` never ends), a directory or a socket is refused at once.

    Raises:
      OSError: it cannot be opened (``FileNotFoundError`` when it is missing).
      ValueError: it is not a regular file (``PATH: a FIFO, not a regular file``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
            raise ValueError(f"{path}: {kind}, not a regular file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, os.fstat(f.fileno()).st_size


def unreadable_reason(error: BaseException) -> str:
    """Why :func:`open_regular` or :func:`read_regular` failed, without the path, for a message
    that names the file once."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).split(": ", 1)[-1]  # their ValueErrors start with the path


def read_regular(path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`); one larger than
    ``max_bytes`` is refused before anything is read (``ValueError`` naming it and both sizes)."""
    f, size = open_regular(path)
    with f:
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} such a file may "
                             "hold")
        return f.read(size)


def read_safetensors(path) -> bytes:
    """The bytes of the safetensors file ``path``, read only once its header has been checked
    against its size: the data is read only when ``8 + header + the tensors' extent`` equals
    the file's size, so memory never exceeds what the header describes.

    Raises:
      OSError: it cannot be opened (``FileNotFoundError`` when it is missing).
      ValueError: not a regular file, or not a safetensors file whose header fits its size
        (the message names the file).
    """
    f, size = open_regular(path)
    with f:
        raw = _safetensors_header(f, size, path)[1]
        return raw + f.read(size - len(raw))


def _safetensors_header(f: BinaryIO, size: int, path) -> tuple[dict, bytes]:
    """The parsed header of the safetensors file open as ``f`` (``size`` bytes) and the bytes
    read so far (length prefix and header), after checking that the tensors' extent it
    describes fills the file exactly."""
    problem = None
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else None
    if length is None or not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
        problem = (f"its header length {length} does not fit its {size} bytes"
                   if length is not None else f"{size} bytes, too short for a header")
    else:
        text = f.read(length)
        try:
            header = json.loads(text)
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                       if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError) as error:
            problem = f"its header is not a safetensors header ({type(error).__name__}: {error})"
        else:
            if 8 + length + end != size:
                problem = (f"its header describes {8 + length + end} bytes, the file has "
                           f"{size}")
    if problem is not None:
        raise ValueError(f"{path}: not a readable safetensors file ({problem})")
    return header, head + text
