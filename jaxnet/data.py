"""Data sets as NumPy arrays on the host; the training loop moves batches to the device.
Every loader returns a :class:`Dataset`; every problem with a file or an array raises
:class:`DataError`, naming the file and what was expected and found.

>>> from jaxnet import data
>>> ds = data.load_digits()
>>> ds.x_train.shape, ds.x_train.dtype, ds.num_classes
((1438, 8, 8, 1), dtype('float32'), 10)
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.resources
import math
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxnet.tensorfile import open_regular

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("digits", "fashion-mnist", "mnist", "npz")
TASKS = ("classification", "regression")  # what an .npz file's y arrays hold

# IDX type codes (the MNIST files' format); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_HOW_TO_GET = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist (`apt-get update && apt-get "
                     f"install dataset-fashion-mnist` puts them in {FASHION_MNIST_DIR}) or pass "
                     "`data_dir`, a directory with the four IDX files",
    "mnist": "pass `data_dir`, a directory with the four MNIST IDX files (train-images-idx3-ubyte"
             "[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
             "t10k-labels-idx1-ubyte[.gz])",
}
# Deflate's largest expansion (258-byte matches coded in about 2 bits): a compressed stream of
# n bytes decompresses to at most this many times n, so a header claiming more is false.
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 16  # bytes decompressed at a time to count, not keep
# What a damaged or foreign file can make gzip, zipfile and np.load raise.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError, OverflowError, MemoryError)


class DataError(ValueError):
    """A data file or array is missing, damaged, or has the wrong shape, dtype or values."""


class Dataset(NamedTuple):
    """A classification data set held in host memory.

    Images are (n, height, width, 1) in [0, 1], channels-last, so an MLP (with Flatten) and a
    CNN both take them. Labels are in [0, num_classes), ``num_classes`` being the largest plus 1.
    A regression set (``load_npz(..., task="regression")``) holds float32 targets ``(n,
    outputs)`` instead, and ``num_classes`` is the number of outputs.

    Loaded with ``train_rows`` (a multi-process run: each process reads only its block of the
    training set), ``x_train`` and ``y_train`` hold only rows ``train_rows`` of the
    ``train_examples`` training examples, and ``num_classes`` counts only the labels loaded
    (these rows and the test set); :mod:`jaxnet.data_shards` combines it over the processes.
    """

    x_train: np.ndarray  # (n_train, *example) float32; with train_rows: (stop - start, *example)
    y_train: np.ndarray  # (n_train,) int32; with train_rows: (stop - start,)
    x_test: np.ndarray  # (n_test, *example) float32
    y_test: np.ndarray  # (n_test,) int32
    num_classes: int
    name: str
    train_rows: slice | None = None  # the rows of the training set held; None: all of them
    train_examples: int | None = None  # with train_rows: the size of the whole training set

    @property
    def num_train(self) -> int:
        """The size of the whole training set (not only of the rows held)."""
        return len(self.x_train) if self.train_rows is None else self.train_examples


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Scales uint8 (pixels) by 1/255; casts other numbers to float32 as they are."""
    return x / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


# Labels beyond these make an absurd output layer (a typo, or regression targets as labels).
MAX_CLASSES = 100_000  # the largest label must be below this
CLASSES_PER_EXAMPLE = 10  # ... and at most this many times the number of examples


def _dataset(x_train, y_train, x_test, y_test, name: str, rows: slice | None = None,
             train_examples: int | None = None, where=None) -> Dataset:
    top = int(max(y_train.max(initial=0), y_test.max()))  # rows may be empty
    examples = (len(y_train) if train_examples is None else train_examples) + len(y_test)
    if top >= MAX_CLASSES or top > CLASSES_PER_EXAMPLE * examples:
        raise DataError(f"{where or name}: the largest label is {top}, which would make an output "
                        f"layer of {top + 1} classes for {examples} examples; labels must be "
                        f"below {MAX_CLASSES} and at most {CLASSES_PER_EXAMPLE}x the examples")
    num_classes = top + 1
    return Dataset(_to_float32(x_train), y_train.astype(np.int32), _to_float32(x_test),
                   y_test.astype(np.int32), num_classes, name, rows, train_examples)


# Which rows of a training set to read: a slice, or a function of the number of rows giving one
# (as ``lambda n: data_parallel.process_rows(n, mesh)``: the count is known once the header is).
Rows = slice | Callable[[int], slice]


def _resolve_rows(rows: Rows, n: int, where) -> slice:
    """``rows`` as ``slice(start, stop)`` with ``0 <= start <= stop <= n``, else a clear error."""
    given = rows(n) if callable(rows) else rows
    if not isinstance(given, slice) or given.step not in (None, 1):
        raise TypeError(f"{where}: rows must be a contiguous slice start:stop, got {given!r}")
    start = 0 if given.start is None else given.start
    stop = n if given.stop is None else given.stop
    is_index = lambda i: isinstance(i, (int, np.integer)) and not isinstance(i, bool)
    if not (is_index(start) and is_index(stop) and 0 <= start <= stop <= n):
        raise IndexError(f"{where}: rows {start}:{stop} are not within its {n} rows; expected "
                         f"0 <= start <= stop <= {n}")
    return slice(int(start), int(stop))


def _read_exactly(stream, size: int, chunk: int = 1 << 24) -> bytearray:
    """Up to ``size`` bytes from ``stream`` (fewer only at its end). Read in chunks, so that a
    damaged header claiming far more than the file holds costs no more memory than the file."""
    buffer = bytearray()
    while len(buffer) < size:
        got = stream.read(min(size - len(buffer), chunk))
        if not got:
            break
        buffer += got
    return buffer


@contextlib.contextmanager
def _reading(where, what: str = "read"):
    """Turns what a damaged file makes gzip, zipfile and NumPy raise into a DataError."""
    try:
        yield
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{where}: cannot {what}: {type(e).__name__}: {e}") from e


def read_idx(path, rows: Rows | None = None) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzipped or raw, whole or only some rows.

    The format is a magic number ``00 00 <type code> <ndim>``, ``ndim`` big-endian int32 sizes,
    then the values in C order.

    Only a regular file is read (a FIFO or a device is refused at once), and never more than
    its header describes: a raw file is checked from its header and size alone before its
    values are read; a gzipped one is decompressed as a stream, into memory only as far as
    the header describes, and refused when more data follows (a gzip bomb behind an
    honest-looking header costs no more memory than the header says). A header claiming more
    than the compressed size can hold (``MAX_DEFLATE_RATIO`` times) is refused as truncated,
    what there is being decompressed only to be counted.

    With ``rows``, only those rows (along the first axis) are read. A raw file is read from
    ``header + start * row_bytes``: only the rows' bytes. gzip cannot seek, so for a gzipped
    file the bytes before ``start`` are decompressed and discarded, none after ``stop`` are
    read (except that reading up to the last row also checks that nothing follows it), and
    memory holds only the rows.

    Args:
      path: the file.
      rows: ``slice(start, stop)`` with ``0 <= start <= stop <= n`` (``n`` the first size), or a
        function ``n -> slice`` (e.g. a process's block); None: the whole file.

    Returns:
      An array of the file's shape (with ``rows``: ``(stop - start, *shape[1:])``), in native
      byte order, of dtype uint8, int8, int16, int32, float32 or float64 (type codes 0x08,
      0x09, 0x0B, 0x0C, 0x0D, 0x0E).

    Raises:
      DataError: an unreadable file, not a regular file, corrupt gzip, a wrong magic number or
        type code, no dimensions, or fewer or more data bytes than the sizes say (with ``rows``
        and gzip: found when reading reaches them).
      IndexError, TypeError: ``rows`` is not a contiguous slice within the file's rows.
    """
    where = Path(path).absolute()
    return _read_idx_rows(where, slice(None) if rows is None else rows)[0]


def _idx_header(where: Path, raw: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, big-endian dtype, header bytes)`` from an IDX file's first bytes (at least its
    header, or the whole file when that is shorter)."""
    if len(raw) < 4 or raw[:2] != b"\0\0":
        found = raw[:4].hex(" ") or "(empty file)"
        raise DataError(f"{where}: not an IDX file: magic number {found}, expected 00 00 <type "
                        "code> <ndim>")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{where}: unknown IDX type code 0x{code:02X}, expected one of "
                        + ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES))
    if ndim == 0:
        raise DataError(f"{where}: IDX header has ndim 0, expected at least 1 dimension")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}: truncated header: {ndim} dimensions need {header} bytes, "
                        f"the file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    return shape, np.dtype(_IDX_DTYPES[code]), header


def _idx_size_error(where: Path, shape, dtype: np.dtype, expected: int, size: int | str
                    ) -> DataError:
    problem = "truncated" if isinstance(size, int) and size < expected else "trailing bytes"
    return DataError(f"{where}: {problem}: shape {shape} of {dtype.newbyteorder('=')} needs "
                     f"{expected} bytes, the file has {size}")


def _read_idx_rows(where: Path, rows: Rows) -> tuple[np.ndarray, tuple[int, ...]]:
    """Rows ``rows`` of an IDX file, and the file's whole shape (see :func:`read_idx`)."""
    with _reading(where), contextlib.ExitStack() as closing:
        f, size = _open_data_file(where)
        closing.enter_context(f)
        gz = f.read(2) == b"\x1f\x8b"  # gzip is recognised by its magic bytes, not its name
        f.seek(0)
        stream = closing.enter_context(gzip.GzipFile(fileobj=f, mode="rb")) if gz else f
        head = stream.read(4)
        if len(head) == 4 and head[:2] == b"\0\0":
            head += stream.read(4 * head[3])
        shape, dtype, header = _idx_header(where, head)
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        expected = header + row_bytes * shape[0]
        if not gz and size != expected:  # checks the whole file
            raise _idx_size_error(where, shape, dtype, expected, size)
        if gz and expected > MAX_DEFLATE_RATIO * size:  # cannot be there: count what is
            while stream.read(_CHUNK):  # at most MAX_DEFLATE_RATIO * size, none of it kept
                pass
            raise _idx_size_error(where, shape, dtype, expected, stream.tell())
        if max(expected, row_bytes) > np.iinfo(np.intp).max:
            raise DataError(f"{where}: shape {shape} of {dtype.newbyteorder('=')} needs more "
                            "bytes than an array can hold")
        rows = _resolve_rows(rows, shape[0], where)
        wanted = (rows.stop - rows.start) * row_bytes
        payload, to_the_end = bytearray(), gz and rows.stop == shape[0]
        if wanted or to_the_end:
            stream.seek(header + rows.start * row_bytes)  # gzip: decompresses, and discards
            payload = _read_exactly(stream, wanted)
        if len(payload) < wanted:  # a gzipped file whose data ends early (a raw one that shrank)
            raise _idx_size_error(where, shape, dtype, expected, stream.tell())
        # up to the last row: nothing may follow (a gzip bomb behind an honest header); reading
        # to the end checks the CRC too. Only a bounded excess is read, to say how much.
        if to_the_end and (extra := len(stream.read(_CHUNK + 1))):
            found = expected + extra if extra <= _CHUNK else f"more than {expected + _CHUNK}"
            raise _idx_size_error(where, shape, dtype, expected, found)
    array = np.frombuffer(payload, dtype).astype(dtype.newbyteorder("="), copy=False)
    return array.reshape(rows.stop - rows.start, *shape[1:]), shape


def _open_data_file(where: Path):
    """``(open file, size)`` of a data file, refused at once (``DataError``) unless it is a
    regular file: a FIFO would block, a device such as ``/dev/zero`` never end."""
    try:
        return open_regular(where)
    except ValueError as error:  # names the file and what it is
        raise DataError(str(error)) from None


def _find_idx(directory: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")
    names = (stem + ".gz", stem, dotted + ".gz", dotted)
    return next((directory / n for n in names if (directory / n).is_file()), None)


def load_idx_dir(directory, name: str, train_rows: Rows | None = None) -> Dataset:
    """Loads an MNIST-like data set, ``name``, from a directory of its four IDX files.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``),
    also with a dot before ``idx`` (``train-images.idx3-ubyte``) as some mirrors name them.

    With ``train_rows`` (a slice, or a function of the training set's size giving one), only
    those training rows are read (:func:`read_idx`); the test set is read whole. Shapes, dtypes
    and counts are checked from the training files' headers before any row is read.

    Returns:
      A :class:`Dataset`: x (n, height, width, 1) float32 in [0, 1], y (n,) int32.

    Raises:
      DataError: a missing directory or file, a damaged file, images not 3-D uint8, labels not
        1-D uint8, no examples, image and label counts or train and test image sizes differ.
      IndexError, TypeError: ``train_rows`` is not a contiguous slice within the training set.
    """
    directory = Path(directory).absolute()  # so that messages name files in full
    paths = [_find_idx(directory, stem) for stem in _IDX_FILES]
    if None in paths:
        missing = ", ".join(stem + "[.gz]" for stem, p in zip(_IDX_FILES, paths) if p is None)
        problem = f"lacks {missing}" if directory.is_dir() else "does not exist"
        how = _HOW_TO_GET.get(name, "put the four IDX files in it")
        raise DataError(f"{name}: directory {directory} {problem}; to get the data, {how}")
    if train_rows is None:
        arrays = [read_idx(p) for p in paths]
        _check_idx_set(paths, [(a.shape, a.dtype) for a in arrays])
        x_train, y_train, x_test, y_test = arrays
        rows = n_train = None
    else:  # headers first (an empty range reads nothing else), then the rows
        headers = [_read_idx_rows(p, slice(0, 0)) for p in paths[:2]]
        x_test, y_test = (read_idx(p) for p in paths[2:])
        _check_idx_set(paths, [(shape, a.dtype) for a, shape in headers]
                       + [(a.shape, a.dtype) for a in (x_test, y_test)])
        n_train = headers[0][1][0]
        rows = _resolve_rows(train_rows, n_train, paths[0])
        x_train, y_train = (read_idx(p, rows) for p in paths[:2])
    return _dataset(x_train[..., None], y_train, x_test[..., None], y_test, name,  # channels-last
                    rows, n_train, paths[1])


def _check_idx_set(paths: list[Path], arrays: list[tuple[tuple[int, ...], np.dtype]]) -> None:
    """Checks the ``(shape, dtype)`` of the four IDX files of a data set."""
    for p, (shape, dtype), ndim in zip(paths, arrays, (3, 1, 3, 1)):
        if len(shape) != ndim or dtype != np.uint8:
            raise DataError(f"{p}: expected a {ndim}-D uint8 array, got shape {shape} of {dtype}")
    (x_train, _), _, (x_test, _), _ = arrays
    for i in (0, 2):
        images, labels = arrays[i][0][0], arrays[i + 1][0][0]
        if images != labels or images == 0:
            raise DataError(f"{paths[i]} has {images} images but {paths[i + 1]} has {labels} "
                            "labels; expected the same number, at least 1")
    if x_train[1:] != x_test[1:]:
        raise DataError(f"{paths[2]}: images are {x_test[1:]}, but the training images "
                        f"in {paths[0]} are {x_train[1:]}")


def load_fashion_mnist(data_dir=None, train_rows: Rows | None = None) -> Dataset:
    """Loads Fashion-MNIST (60000 train, 10000 test (28, 28, 1) images, 10 classes) from
    ``data_dir``, by default where Debian's ``dataset-fashion-mnist`` puts its four IDX files.
    ``train_rows``: read only those training rows (see :func:`load_idx_dir`)."""
    return load_idx_dir(FASHION_MNIST_DIR if data_dir is None else data_dir, "fashion-mnist",
                        train_rows)


def load_mnist(data_dir, train_rows: Rows | None = None) -> Dataset:
    """Loads MNIST (60000 train, 10000 test (28, 28, 1) images) from ``data_dir``, not None.
    ``train_rows``: read only those training rows (see :func:`load_idx_dir`)."""
    if data_dir is None:
        raise DataError(f"mnist: no data directory given; {_HOW_TO_GET['mnist']}")
    return load_idx_dir(data_dir, "mnist", train_rows)


def _open_npz(f, where, keys: tuple[str, ...]):
    """``np.load`` of the open file ``f`` without unpickling; a DataError naming ``where`` unless
    it is an .npz archive holding every one of ``keys``."""
    archive = np.load(f, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: not an .npz archive (a single .npy array?), expected "
                        f"arrays {', '.join(keys)}")
    missing = [k for k in keys if k not in archive.files]
    if missing:
        raise DataError(f"{where}: missing arrays {', '.join(missing)}; it has "
                        f"{', '.join(archive.files) or 'none'}, expected {', '.join(keys)}")
    return archive


def _read_npz(path, where, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Reads ``keys`` from an .npz file (a Path or a package resource) without unpickling.
    Every failure becomes a DataError. We open the file ourselves so that it is closed even
    when np.load fails half-way through a damaged archive (and refuse a FIFO or a device
    at once: zipfile decompresses no member beyond the size the archive declares for it)."""
    try:
        with _open_data_file(path)[0] if isinstance(path, Path) else path.open("rb") as f:
            archive = _open_npz(f, where, keys)
            return {k: archive[k] for k in keys}  # members are decompressed (and checked) here
    except _READ_ERRORS as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: cannot read as .npz: {type(e).__name__}: {e}") from e


def load_digits(train_rows: Rows | None = None) -> Dataset:
    """Loads the UCI handwritten digits (scikit-learn's copy) embedded in jaxnet.

    1797 images of 8x8 pixels, 10 classes. The split is fixed and stratified: for each class
    in turn, a permutation from ``np.random.default_rng(0)`` sends the first ``round(0.8 * n)``
    of its examples to train and the rest to test; each set keeps the file's order. This gives
    **1438 training and 359 test examples**.

    ``train_rows`` keeps only those training rows (a slice, or a function of 1438 giving one).
    The embedded file is tiny (~120 KB) and the split needs every label, so it is read whole
    and then sliced.

    Returns:
      A :class:`Dataset`: x (n, 8, 8, 1) float32 in [0, 1] (counts 0..16 / 16), y (n,) int32.
    """
    resource = importlib.resources.files("jaxnet.datasets").joinpath("digits.npz")
    arrays = _read_npz(resource, resource, ("images", "labels"))
    images = arrays["images"][..., None] / np.float32(16)  # (1797, 8, 8, 1) float32
    labels = arrays["labels"].astype(np.int32)
    rng, is_train = np.random.default_rng(0), np.zeros(len(labels), bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        is_train[members[:round(0.8 * len(members))]] = True
    dataset = Dataset(images[is_train], labels[is_train], images[~is_train], labels[~is_train],
                      10, "digits")
    if train_rows is None:
        return dataset
    rows = _resolve_rows(train_rows, len(dataset.x_train), "digits training set")
    return dataset._replace(x_train=dataset.x_train[rows], y_train=dataset.y_train[rows],
                            train_rows=rows, train_examples=len(dataset.x_train))


def load_npz(path, train_rows: Rows | None = None, *, task: str = "classification") -> Dataset:
    """Loads a user's .npz file with arrays ``x_train, y_train, x_test, y_test``.

    The file is read with ``allow_pickle=False``; its stem becomes ``Dataset.name``. The example
    shape is kept as given (no channel axis is added). uint8 inputs are scaled by 1/255; other
    numeric inputs are cast to float32 as they are.

    ``task="regression"``: ``y_train`` and ``y_test`` are numeric targets, ``(n,)`` or
    ``(n, outputs)``, finite, returned as float32 ``(n, outputs)`` (``(n, 1)`` for ``(n,)``),
    and ``num_classes`` is the number of outputs. The whole training set is read (no
    ``train_rows``).

    With ``train_rows`` (a slice, or a function of the training set's size giving one), only
    those rows of ``x_train`` and ``y_train`` are read; the test arrays are read whole. Shapes,
    dtypes and counts are checked from the members' ``.npy`` headers first; values (finite
    inputs, label range) only in the rows read. An uncompressed member (``np.savez``) is read
    starting at the rows' offset in the file: only their bytes. A compressed one (``np.savez_compressed``)
    cannot seek: it is decompressed as a stream up to the last row, the bytes before the first
    discarded. A Fortran-order member (rows not contiguous) is read whole, then sliced. Member
    CRCs are checked only when a member is read to its end.

    Returns:
      A :class:`Dataset`: x (n, *example) float32, y (n,) int32 (regression: (n, outputs)
      float32).

    Raises:
      DataError: an unreadable or non-.npz file, a missing or object array, x not numeric or not
        finite, labels not 1-D non-negative integers (regression: targets not numeric, not
        finite, or of different shapes), counts 0 or unequal, example shapes differ, or an
        unknown ``task``.
      IndexError, TypeError: ``train_rows`` is not a contiguous slice within the training set.
    """
    where = Path(path).absolute()
    keys = ("x_train", "y_train", "x_test", "y_test")
    if task not in TASKS:
        raise DataError(f"{where}: task must be one of {', '.join(TASKS)}; got {task!r}")
    if task == "regression":
        if train_rows is not None:
            raise DataError(f"{where}: task regression reads the whole training set (one "
                            "process); train_rows is for classification sets")
        return _regression_set(where, Path(path).stem, _read_npz(where, where, keys))
    rows = n_train = None
    if train_rows is None:
        a = _read_npz(where, where, keys)
    else:
        a, rows, n_train = _read_npz_rows(where, keys, train_rows)
    for split in ("train", "test"):
        x, y = a["x_" + split], a["y_" + split]
        if x.dtype.kind not in "uif" or x.ndim == 0:
            raise DataError(f"{where}: x_{split} must be a numeric (integer or float) array "
                            f"with a leading example axis, got shape {x.shape} of {x.dtype}")
        with np.errstate(over="ignore"):  # values beyond float32's range become inf, caught next
            a["x_" + split] = x = _to_float32(x)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: x_{split} has NaN or infinite values (in float32)")
        if y.dtype.kind not in "ui" or y.ndim != 1:
            raise DataError(f"{where}: y_{split} must be a 1-D integer array of class labels, "
                            f"got shape {y.shape} of {y.dtype}" + (
                                " (regression targets need task regression)"
                                if y.dtype.kind in "uif" else ""))
        if len(x) != len(y) or len(y) == 0 and not (rows is not None and split == "train"):
            raise DataError(f"{where}: x_{split} has {len(x)} examples but y_{split} has {len(y)}"
                            " labels; expected the same number, at least 1")
        if len(y) and (y.min() < 0 or y.max() > np.iinfo(np.int32).max):
            raise DataError(f"{where}: y_{split} labels must be in [0, 2**31), found "
                            f"{y.min()}..{y.max()}")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"{where}: x_train examples have shape {a['x_train'].shape[1:]} but "
                        f"x_test examples {a['x_test'].shape[1:]}")
    return _dataset(a["x_train"], a["y_train"], a["x_test"], a["y_test"], Path(path).stem,
                    rows, n_train, where)


def _regression_set(where: Path, name: str, a: dict[str, np.ndarray]) -> Dataset:
    """A :class:`Dataset` of regression targets from ``load_npz``'s arrays (see there)."""
    for split in ("train", "test"):
        x, y = a["x_" + split], a["y_" + split]
        if x.dtype.kind not in "uif" or x.ndim == 0:
            raise DataError(f"{where}: x_{split} must be a numeric (integer or float) array "
                            f"with a leading example axis, got shape {x.shape} of {x.dtype}")
        if y.dtype.kind not in "uif" or y.ndim not in (1, 2):
            raise DataError(f"{where}: y_{split} must hold numeric regression targets of shape "
                            f"(n,) or (n, outputs), got shape {y.shape} of {y.dtype}")
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"{where}: x_{split} has {len(x)} examples but y_{split} has {len(y)}"
                            " targets; expected the same number, at least 1")
        with np.errstate(over="ignore"):  # beyond float32's range: inf, caught next
            a["x_" + split] = x = _to_float32(x)
            a["y_" + split] = y = y.astype(np.float32).reshape(len(y), -1)
        for what, values in (("x", x), ("y", y)):
            if not np.isfinite(values).all():
                raise DataError(f"{where}: {what}_{split} has NaN or infinite values (in float32)")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"{where}: x_train examples have shape {a['x_train'].shape[1:]} but "
                        f"x_test examples {a['x_test'].shape[1:]}")
    if a["y_train"].shape[1] != a["y_test"].shape[1]:
        raise DataError(f"{where}: y_train has {a['y_train'].shape[1]} targets per example but "
                        f"y_test {a['y_test'].shape[1]}")
    return Dataset(a["x_train"], a["y_train"], a["x_test"], a["y_test"], a["y_train"].shape[1],
                   name)


def _read_npz_rows(where: Path, keys: tuple[str, ...], train_rows: Rows
                   ) -> tuple[dict[str, np.ndarray], slice, int]:
    """``x_train`` and ``y_train``: only rows ``train_rows``; the other keys whole; also the
    slice and the training set's size. Headers are checked (as :func:`load_npz` checks the
    arrays) before any row is read."""
    with _reading(where, "read as .npz"), _open_data_file(where)[0] as f:
        archive = _open_npz(f, where, keys)
        members = {k: _npy_member(archive.zip, k) for k in ("x_train", "y_train")}
        (x_shape, x_dtype), (y_shape, y_dtype) = ((m.shape, m.dtype) for m in members.values())
        if x_dtype.kind not in "uif" or len(x_shape) == 0:
            raise DataError(f"{where}: x_train must be a numeric (integer or float) array with a "
                            f"leading example axis, got shape {x_shape} of {x_dtype}")
        if y_dtype.kind not in "ui" or len(y_shape) != 1:
            raise DataError(f"{where}: y_train must be a 1-D integer array of labels, got shape "
                            f"{y_shape} of {y_dtype}")
        if x_shape[0] != y_shape[0] or x_shape[0] == 0:
            raise DataError(f"{where}: x_train has {x_shape[0]} examples but y_train has "
                            f"{y_shape[0]} labels; expected the same number, at least 1")
        rows = _resolve_rows(train_rows, x_shape[0], f"{where}: x_train")
        arrays = {k: _read_member_rows(f, archive.zip, m, rows, where)
                  for k, m in members.items()}
        arrays.update((k, archive[k]) for k in keys if k not in arrays)
    return arrays, rows, x_shape[0]


class _NpyMember(NamedTuple):
    """A ``.npy`` member of a zip archive, as its header describes it."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_size: int  # bytes before the values


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}


def _npy_member(archive: zipfile.ZipFile, key: str) -> _NpyMember:
    """The header of member ``key`` (``key.npy``), read without reading its values."""
    names = archive.namelist()
    info = archive.getinfo(key + ".npy" if key + ".npy" in names else key)
    with archive.open(info) as member:  # checks the member's local header (and encryption)
        version = np.lib.format.read_magic(member)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f"{key}: .npy format version {version} is not supported")
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](member)
        header_size = member.tell()
    if dtype.hasobject:
        raise ValueError(f"{key} holds Python objects, which are not loaded (allow_pickle=False)")
    if info.file_size != header_size + dtype.itemsize * math.prod(shape):
        raise ValueError(f"{key}: shape {shape} of {dtype} needs "
                         f"{header_size + dtype.itemsize * math.prod(shape)} bytes, the member "
                         f"has {info.file_size}")
    return _NpyMember(info, tuple(shape), dtype, fortran_order, header_size)


def _read_member_rows(f, archive: zipfile.ZipFile, member: _NpyMember, rows: slice,
                      where: Path) -> np.ndarray:
    """Rows ``rows`` of a ``.npy`` member; ``f`` is the archive's open file."""
    info, shape, dtype = member.info, member.shape, member.dtype
    if member.fortran_order and len(shape) > 1:  # a row's values are spread over the member
        with archive.open(info) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)[rows]
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    wanted = (rows.stop - rows.start) * row_bytes
    payload = bytearray()
    if wanted and info.compress_type == zipfile.ZIP_STORED:  # the values lie as they are in f
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header, then its name and extra field
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{where}: {info.filename}: damaged local zip header")
        name_size, extra_size = struct.unpack("<HH", local[26:30])
        values = info.header_offset + 30 + name_size + extra_size + member.header_size
        f.seek(values + rows.start * row_bytes)
        payload = _read_exactly(f, wanted)
    elif wanted:  # a compressed member cannot seek: decompress up to the rows, keep only them
        with archive.open(info) as stream:
            stream.seek(member.header_size + rows.start * row_bytes)
            payload = _read_exactly(stream, wanted)
    if len(payload) < wanted:
        raise DataError(f"{where}: {info.filename}: truncated: rows {rows.start}:{rows.stop} "
                        f"need {wanted} bytes, found {len(payload)}")
    array = np.frombuffer(payload, dtype).astype(dtype.newbyteorder("="), copy=False)
    return array.reshape(rows.stop - rows.start, *shape[1:])


def load_dataset(name: str, data_dir=None, path=None, train_rows: Rows | None = None, *,
                 task: str = "classification") -> Dataset:
    """Loads a data set by name, one of :data:`DATASETS`. ``data_dir`` is for fashion-mnist
    (optional) and mnist (required), ``path`` for npz (required); with ``train_rows`` (a slice
    or a function of the training set's size giving one) only those training rows are read.
    ``task="regression"`` is for npz (:func:`load_npz`); the others are classification sets.
    Raises DataError for an unknown name, a missing or unused argument, or a task the set has
    not."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    takes = {"fashion-mnist": "data_dir", "mnist": "data_dir", "npz": "path"}.get(name)
    for arg, value in (("data_dir", data_dir), ("path", path)):
        if value is not None and arg != takes:
            raise DataError(f"{name}: takes no {arg} (given {value!r})")
    if name == "npz" and path is None:
        raise DataError("npz: no path given; pass an .npz file with x_train, y_train, x_test, "
                        "y_test")
    if task != "classification" and name != "npz":
        raise DataError(f"{name}: a classification data set; task {task!r} needs your own npz "
                        "file (x_train, y_train, x_test, y_test)")
    loaders = {"digits": lambda: load_digits(train_rows),
               "fashion-mnist": lambda: load_fashion_mnist(data_dir, train_rows),
               "mnist": lambda: load_mnist(data_dir, train_rows),
               "npz": lambda: load_npz(path, train_rows, task=task)}
    return loaders[name]()


def standardize(x_train: np.ndarray, x_test: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Subtracts the training set's mean and divides by its standard deviation.

    Both are scalars over all of ``x_train`` (every example and feature), computed in float64;
    the test set is transformed with the training statistics.

    Args:
      x_train: (n_train, ...) numeric.
      x_test: (n_test, ...) numeric.

    Returns:
      ``(x_train, x_test, stats)``: float32 arrays of the same shapes, ``x_train`` now with mean
      0 and std 1, and ``stats = {"mean": m, "std": s}`` to apply to new inputs.

    Raises:
      DataError: ``x_train`` is empty, constant or not finite (its std is not > 0).
    """
    x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
    with np.errstate(invalid="ignore"):  # an inf in x_train gives a NaN std, rejected below
        std = x_train.std(dtype=np.float64) if x_train.size else 0.0
    if not std > 0:
        raise DataError(f"cannot standardize: x_train of shape {x_train.shape} has standard "
                        f"deviation {std}, expected > 0")
    mean, std = np.float32(x_train.mean(dtype=np.float64)), np.float32(std)
    return (x_train - mean) / std, (x_test - mean) / std, {"mean": float(mean), "std": float(std)}


def open_npy(path) -> np.ndarray:
    """The array in the ``.npy`` file ``path``, memory-mapped read-only (nothing is read until
    it is used), never unpickled.

    Raises:
      DataError: the file is missing, unreadable, not a regular file (a FIFO, a device), not a
        ``.npy`` array (an ``.npz`` archive, a pickle) or holds objects; the message names it.
    """
    where = Path(path).absolute()
    try:
        with _open_data_file(where)[0] as f:  # a FIFO or a device is refused, not waited on
            magic = f.read(6)
        if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":  # np.load would try pickle
            raise ValueError(f"it starts with {magic!r}, not the .npy magic b'\\x93NUMPY'")
        x = np.load(where, mmap_mode="r", allow_pickle=False)
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DataError(f"{where}: cannot read as a .npy array: {reason}") from None
    if not isinstance(x, np.ndarray):
        x.close()
        raise DataError(f"{where}: an .npz archive, expected a single .npy array")
    return x
