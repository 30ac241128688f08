"""The host side of streaming (:mod:`jaxnet.train.streaming`): what streams, chunk sources
and the thread that fills the device queue.

A source cuts data into host chunks ``(xs (K, B, *example), ys (K, B, ...), weights (K, B))``:
:class:`MemmapSource` for ``(x, y)`` arrays read window by window (memory-mapped files), and
:class:`IterableSource` for an iterable of ``(x, y)`` batches. ``x`` and ``y`` may be pytrees
(dicts or tuples of arrays sharing the leading axis); ``xs`` and ``ys`` then are too.
:class:`ChunkQueue` reads a source's chunks on a host thread and ``jax.device_put``s them into a
bounded queue. The order is described in :mod:`jaxnet.train.streaming`.
"""

from __future__ import annotations

import itertools
import mmap
import queue
import threading
import zipfile
from typing import Callable, Iterator

from collections.abc import Mapping

import jax
import numpy as np

from jaxnet.train.engine import EpochPlan, epoch_order
from jaxnet.train.setup import count_examples

CHUNK_BYTES = 16 << 20  # default chunk size: large enough to amortise a call, small next to RAM
THREAD_NAME = "jaxnet-stream"


# --- what streams --------------------------------------------------------------------------

def is_memmap(a) -> bool:
    """Whether ``a`` is a ``np.memmap`` or an array whose ``.base`` chain reaches an mmap."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _is_arrays(a) -> bool:
    """An array, or a pytree (dict, tuple) of arrays."""
    leaves = jax.tree.leaves(a)
    return bool(leaves) and all(map(_is_array, leaves))


def _is_batch(a) -> bool:
    return isinstance(a, (tuple, list)) and len(a) == 2 and all(map(_is_arrays, a))


def _is_pair(a) -> bool:
    """Whether ``a`` is one ``(x, y)`` pair of arrays (or pytrees of arrays) rather than a
    sequence of batches: a pair whose x and y are both ``(x, y)``-like pairs reads as two
    batches (use a dict for such inputs)."""
    return _is_batch(a) and not all(map(_is_batch, a))


def is_streaming(data) -> bool:
    """Whether ``fit``/``evaluate`` stream ``data`` rather than move it to the device whole:
    an ``(x, y)`` pair with a memory-mapped array, or an iterable of ``(x, y)`` batches."""
    if _is_pair(data):
        return any(map(is_memmap, jax.tree.leaves(data)))
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(map(_is_batch, data))
    return (hasattr(data, "__iter__") and not _is_array(data)
            and not isinstance(data, (str, bytes, Mapping)))


def load_memmap(path) -> np.ndarray | dict[str, np.ndarray]:
    """A ``.npy`` file as a read-only memmap, or an uncompressed ``.npz`` as ``{name: memmap}``.

    ``np.load(..., mmap_mode="r")`` reads ``.npz`` members into memory; their bytes are stored
    as they are in an uncompressed zip (``np.savez``), so they can be mapped in place.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        return np.load(path, mmap_mode="r")
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"load_memmap: {path}: {info.filename} is compressed "
                                 "(np.savez_compressed); memory-mapping needs np.savez")
            f.seek(info.header_offset + 26)  # local header: name and extra lengths at 26
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
            f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            arrays[info.filename.removesuffix(".npy")] = np.memmap(
                path, dtype, "r", offset=f.tell(), shape=shape, order="F" if fortran else "C")
    return arrays


def _mappings(a) -> list[mmap.mmap]:
    """The shared (``"r"``/``"r+"``) mappings under ``a``, whose pages may be dropped."""
    safe, found = False, []
    while a is not None:
        if isinstance(a, np.memmap) and a.mode in ("r", "r+", "readonly", "readwrite"):
            safe = True
        if isinstance(a, mmap.mmap) and safe:
            found.append(a)
        a = getattr(a, "base", None) if not isinstance(a, mmap.mmap) else None
    return found


def _drop_pages(mappings) -> None:
    """Unmaps the pages read so far from this process (they stay in the page cache): the
    kernel keeps a mapped file's pages resident in the process until memory runs short, so
    one pass over a file larger than RAM would otherwise count its whole size as resident."""
    for m in mappings:
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


# --- chunk sources: host numpy chunks (xs (K, B, ...), ys (K, B, ...), weights (K, B)) -------

class MemmapSource:
    """Chunks of a (memory-mapped) ``(x, y)``; see the module docstring for the order."""

    def __init__(self, x, y, batch_size: int, chunk_steps: int, shuffle: str,
                 what: str = "train_data"):
        self.n = count_examples((x, y), what)
        self.x, self.y, self.shuffle = x, y, shuffle
        self.batch_size = min(batch_size, self.n)
        self.plan = EpochPlan.of(self.n, self.batch_size)
        self.chunk_steps = min(chunk_steps, self.plan.num_batches)
        self.steps_per_epoch = self.plan.num_batches
        self.example = _rows((x, y), slice(0, 1))
        self._mappings = [m for a in jax.tree.leaves((x, y)) for m in _mappings(a)]

    @property
    def has_idle_steps(self) -> bool:
        return self.plan.num_batches % self.chunk_steps != 0

    def chunks(self, run_key, epoch: int) -> Iterator[tuple]:
        """Epoch ``epoch``'s chunks. The order is drawn here, on the calling thread, from
        ``run_key`` (which a later donating call may delete); the rows are read lazily."""
        if self.shuffle == "global":  # the resident fit's batches, by random reads
            order = np.asarray(epoch_order(run_key, epoch, self.plan)).reshape(-1)
            weights = (np.ones(order.shape, np.float32) if self.plan.weights is None
                       else self.plan.weights.reshape(-1))
            return self._gathered(order, weights)
        starts, rng = np.arange(0, self.n, self.chunk_steps * self.batch_size), None
        if self.shuffle == "window":
            seed = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(run_key, 2), epoch))
            rng = np.random.default_rng(np.asarray(seed).astype(np.uint32).reshape(-1))
            starts = rng.permutation(starts)
        return self._windows(starts, rng)

    def _gathered(self, order, weights):
        window = self.chunk_steps * self.batch_size
        for start in range(0, order.size, window):
            rows, w = order[start:start + window], weights[start:start + window]
            sorted_rows = np.sort(rows)  # read in file order, then put in batch order
            where = np.searchsorted(sorted_rows, rows)
            yield self._pack(*_rows(_rows((self.x, self.y), sorted_rows), where), w)

    def _windows(self, starts, rng):
        window = self.chunk_steps * self.batch_size
        for start in starts:
            real = min(window, self.n - start)
            rows = rng.permutation(real) if rng is not None else np.arange(real)
            # top up the last batch with real rows of weight 0 (sane BatchNorm statistics)
            rows = np.resize(rows, -(-real // self.batch_size) * self.batch_size)
            w = (np.arange(rows.size) < real).astype(np.float32)
            # one copy, straight from the mapped window into the chunk's order
            window_rows = _rows((self.x, self.y), slice(start, start + real))
            yield self._pack(*_rows(window_rows, rows), w)

    def epoch_size(self) -> tuple[int, int]:
        """``(examples, batches)`` of the last epoch."""
        return self.n, self.plan.num_batches

    def _pack(self, xs, ys, w):
        _drop_pages(self._mappings)
        return _pad_chunk(xs, ys, w, self.chunk_steps, self.batch_size)


def _rows(tree, rows):
    """Rows ``rows`` (a slice or indices) of every array in ``tree``, as NumPy arrays."""
    return jax.tree.map(lambda a: np.asarray(a[rows]), tree)


def _pad_chunk(xs, ys, w, steps: int, batch: int):
    """``(K, B, ...)`` stacks: whole batches of weight 0 (copies of row 0) fill a short chunk."""
    missing = steps * batch - w.shape[0]
    if missing:
        xs, ys = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], missing, 0)]),
                              (xs, ys))
        w = np.concatenate([w, np.zeros(missing, np.float32)])
    xs, ys = jax.tree.map(lambda a: a.reshape(steps, batch, *a.shape[1:]), (xs, ys))
    return xs, ys, w.reshape(steps, batch)


class IterableSource:
    """Chunks of an iterable of ``(x, y)`` numpy batches, in its order; ``iter(data)`` is
    called once per epoch. The first batch's rows set the batch size; shorter batches are
    padded (weight 0), longer ones are an error."""

    has_idle_steps = True

    def __init__(self, data, chunk_steps: int | None):
        self.data = data
        self._first_iterator = iter(data)
        try:
            first = next(self._first_iterator)
        except StopIteration:
            raise ValueError("train_data: the iterable yielded no batches") from None
        self._first = first = self._check(first, 0)
        self.batch_size = len(jax.tree.leaves(first)[0])
        self.example = _rows(first, slice(0, 1))
        self.chunk_steps = chunk_steps or default_chunk_steps(first, self.batch_size)
        try:
            self.steps_per_epoch = len(data)
        except TypeError:
            self.steps_per_epoch = None

    def _check(self, batch, index: int):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"train_data: batch {index} is not an (x, y) pair but a "
                            f"{type(batch).__name__}")
        x, y = jax.tree.map(np.asarray, tuple(batch), is_leaf=lambda a: isinstance(a, list))
        rows = count_examples((x, y), f"train_data: batch {index}")
        if index and rows > self.batch_size:
            raise ValueError(f"train_data: batch {index} has {rows} rows, more than the "
                             f"first batch's {self.batch_size}")
        return x, y

    def chunks(self, run_key, epoch: int) -> Iterator[tuple]:
        if self._first is not None:  # the batch read to learn the shapes is epoch 0's first
            batches = itertools.chain([self._first], self._first_iterator)
            self._first = self._first_iterator = None
        else:
            batches = iter(self.data)
        steps, batch = self.chunk_steps, self.batch_size
        self._size = [0, 0]
        for group in _grouped(enumerate(batches), steps):
            xs, ys, ws = [], [], []
            for index, b in group:
                x, y = self._check(b, index)
                real = len(jax.tree.leaves(x)[0])
                rows = np.resize(np.arange(real), batch)
                xs.append(_rows(x, rows)), ys.append(_rows(y, rows))
                ws.append((np.arange(batch) < real).astype(np.float32))
                self._size[0] += real
                self._size[1] += 1
            stack = lambda parts: jax.tree.map(lambda *a: np.concatenate(a), *parts)  # noqa: E731
            yield _pad_chunk(stack(xs), stack(ys), np.concatenate(ws), steps, batch)


    def epoch_size(self) -> tuple[int, int]:
        """``(examples, batches)`` of the last epoch."""
        return tuple(self._size)


def _grouped(iterator, size: int):
    iterator = iter(iterator)
    while group := list(itertools.islice(iterator, size)):
        yield group


def default_chunk_steps(example, batch_size: int) -> int:
    """Steps per chunk: about :data:`CHUNK_BYTES` of data, at most 64 steps."""
    row_bytes = sum(np.asarray(a[:1]).nbytes for a in jax.tree.leaves(example))
    return int(np.clip(CHUNK_BYTES // max(row_bytes * batch_size, 1), 1, 64))


# --- the host thread ----------------------------------------------------------------------

class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class ChunkQueue:
    """A host thread that reads ``chunks`` and ``jax.device_put``s them into a bounded queue.

    Iterate over it for the device chunks; an exception in the thread (the iterable's, a read
    error) is raised again, the same object, from the iteration. ``close()`` (or leaving the
    ``with`` block) stops the thread and waits for it.
    """

    def __init__(self, chunks: Iterator, depth: int = 2, check: Callable | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(chunks, check),
                                        name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, chunks, check) -> None:
        try:
            for chunk in chunks:
                if check is not None:
                    check(chunk)
                if not self._put(jax.device_put(chunk)):
                    return
            self._put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(error))

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
