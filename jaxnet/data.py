"""Data sets as NumPy arrays on the host; the training loop moves batches to the device.
Every loader returns a :class:`Dataset`; every problem with a file or an array raises
:class:`DataError`, naming the file and what was expected and found.

>>> from jaxnet import data
>>> ds = data.load_digits()
>>> ds.x_train.shape, ds.x_train.dtype, ds.num_classes
((1438, 8, 8, 1), dtype('float32'), 10)
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("digits", "fashion-mnist", "mnist", "npz")

# IDX type codes (http://yann.lecun.com/exdb/mnist/); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_HOW_TO_GET = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist (`apt-get update && apt-get "
                     f"install dataset-fashion-mnist` puts them in {FASHION_MNIST_DIR}) or pass "
                     "--data-dir a directory with the four IDX files",
    "mnist": "pass --data-dir a directory with the four MNIST IDX files (train-images-idx3-ubyte"
             "[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
             "t10k-labels-idx1-ubyte[.gz])",
}
# What a damaged or foreign file can make gzip, zipfile and np.load raise.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError, OverflowError, MemoryError)


class DataError(ValueError):
    """A data file or array is missing, damaged, or has the wrong shape, dtype or values."""


class Dataset(NamedTuple):
    """A classification data set held in host memory.

    Images are (n, height, width, 1) in [0, 1], channels-last, so an MLP (with Flatten) and a
    CNN both take them. Labels are in [0, num_classes), ``num_classes`` being the largest plus 1.
    """

    x_train: np.ndarray  # (n_train, *example) float32
    y_train: np.ndarray  # (n_train,) int32
    x_test: np.ndarray  # (n_test, *example) float32
    y_test: np.ndarray  # (n_test,) int32
    num_classes: int
    name: str


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Scales uint8 (pixels) by 1/255; casts other numbers to float32 as they are."""
    return x / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


def _dataset(x_train, y_train, x_test, y_test, name: str) -> Dataset:
    return Dataset(_to_float32(x_train), y_train.astype(np.int32), _to_float32(x_test),
                   y_test.astype(np.int32), int(max(y_train.max(), y_test.max())) + 1, name)


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzipped or raw.

    The format is a magic number ``00 00 <type code> <ndim>``, ``ndim`` big-endian int32 sizes,
    then the values in C order.

    Returns:
      An array of the file's shape, in native byte order, of dtype uint8, int8, int16, int32,
      float32 or float64 (type codes 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E).

    Raises:
      DataError: an unreadable file or corrupt gzip, a wrong magic number or type code, no
        dimensions, or fewer or more data bytes than the sizes say.
    """
    where = Path(path).absolute()
    try:  # gzip is recognised by its magic bytes, whatever the file's name
        raw = where.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except _READ_ERRORS as e:
        raise DataError(f"{where}: cannot read: {type(e).__name__}: {e}") from e
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
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + dtype.itemsize * math.prod(shape)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes"
        raise DataError(f"{where}: {problem}: shape {shape} of {dtype.newbyteorder('=')} needs "
                        f"{expected} bytes, the file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).astype(dtype.newbyteorder("=")).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")
    names = (stem + ".gz", stem, dotted + ".gz", dotted)
    return next((directory / n for n in names if (directory / n).is_file()), None)


def load_idx_dir(directory, name: str) -> Dataset:
    """Loads an MNIST-like data set, ``name``, from a directory of its four IDX files.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``),
    also with a dot before ``idx`` (``train-images.idx3-ubyte``) as some mirrors name them.

    Returns:
      A :class:`Dataset`: x (n, height, width, 1) float32 in [0, 1], y (n,) int32.

    Raises:
      DataError: a missing directory or file, a damaged file, images not 3-D uint8, labels not
        1-D uint8, no examples, image and label counts or train and test image sizes differ.
    """
    directory = Path(directory).absolute()  # so that messages name files in full
    paths = [_find_idx(directory, stem) for stem in _IDX_FILES]
    if None in paths:
        missing = ", ".join(stem + "[.gz]" for stem, p in zip(_IDX_FILES, paths) if p is None)
        problem = f"lacks {missing}" if directory.is_dir() else "does not exist"
        how = _HOW_TO_GET.get(name, "put the four IDX files in it")
        raise DataError(f"{name}: directory {directory} {problem}; to get the data, {how}")
    arrays = [read_idx(p) for p in paths]
    for p, a, ndim in zip(paths, arrays, (3, 1, 3, 1)):
        if a.ndim != ndim or a.dtype != np.uint8:
            raise DataError(f"{p}: expected a {ndim}-D uint8 array, got shape {a.shape} of "
                            f"{a.dtype}")
    x_train, y_train, x_test, y_test = arrays
    for i in (0, 2):
        if len(arrays[i]) != len(arrays[i + 1]) or len(arrays[i]) == 0:
            raise DataError(f"{paths[i]} has {len(arrays[i])} images but {paths[i + 1]} has "
                            f"{len(arrays[i + 1])} labels; expected the same number, at least 1")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{paths[2]}: images are {x_test.shape[1:]}, but the training images "
                        f"in {paths[0]} are {x_train.shape[1:]}")
    return _dataset(x_train[..., None], y_train, x_test[..., None], y_test, name)  # channels-last


def load_fashion_mnist(data_dir=None) -> Dataset:
    """Loads Fashion-MNIST (60000 train, 10000 test (28, 28, 1) images, 10 classes) from
    ``data_dir``, by default where Debian's ``dataset-fashion-mnist`` puts its four IDX files."""
    return load_idx_dir(FASHION_MNIST_DIR if data_dir is None else data_dir, "fashion-mnist")


def load_mnist(data_dir) -> Dataset:
    """Loads MNIST (60000 train, 10000 test (28, 28, 1) images) from ``data_dir``, not None."""
    if data_dir is None:
        raise DataError(f"mnist: no data directory given; {_HOW_TO_GET['mnist']}")
    return load_idx_dir(data_dir, "mnist")


def _read_npz(path, where, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Reads ``keys`` from an .npz file (a Path or a package resource) without unpickling.
    Every failure becomes a DataError. We open the file ourselves so that it is closed even
    when np.load fails half-way through a damaged archive."""
    try:
        with path.open("rb") as f:
            archive = np.load(f, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{where}: not an .npz archive (a single .npy array?), expected "
                                f"arrays {', '.join(keys)}")
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(f"{where}: missing arrays {', '.join(missing)}; it has "
                                f"{', '.join(archive.files) or 'none'}, expected {', '.join(keys)}")
            return {k: archive[k] for k in keys}  # members are decompressed (and checked) here
    except _READ_ERRORS as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: cannot read as .npz: {type(e).__name__}: {e}") from e


def load_digits() -> Dataset:
    """Loads the UCI handwritten digits (scikit-learn's copy) embedded in jaxnet.

    1797 images of 8x8 pixels, 10 classes. The split is fixed and stratified: for each class
    in turn, a permutation from ``np.random.default_rng(0)`` sends the first ``round(0.8 * n)``
    of its examples to train and the rest to test; each set keeps the file's order. This gives
    **1438 training and 359 test examples**.

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
    return Dataset(images[is_train], labels[is_train], images[~is_train], labels[~is_train],
                   10, "digits")


def load_npz(path) -> Dataset:
    """Loads a user's .npz file with arrays ``x_train, y_train, x_test, y_test``.

    The file is read with ``allow_pickle=False``; its stem becomes ``Dataset.name``. The example
    shape is kept as given (no channel axis is added). uint8 inputs are scaled by 1/255; other
    numeric inputs are cast to float32 as they are.

    Returns:
      A :class:`Dataset`: x (n, *example) float32, y (n,) int32.

    Raises:
      DataError: an unreadable or non-.npz file, a missing or object array, x not numeric or not
        finite, labels not 1-D non-negative integers, counts 0 or unequal, or example shapes differ.
    """
    where = Path(path).absolute()
    a = _read_npz(where, where, ("x_train", "y_train", "x_test", "y_test"))
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
            raise DataError(f"{where}: y_{split} must be a 1-D integer array of labels, got "
                            f"shape {y.shape} of {y.dtype}")
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"{where}: x_{split} has {len(x)} examples but y_{split} has {len(y)}"
                            " labels; expected the same number, at least 1")
        if y.min() < 0 or y.max() > np.iinfo(np.int32).max:
            raise DataError(f"{where}: y_{split} labels must be in [0, 2**31), found "
                            f"{y.min()}..{y.max()}")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"{where}: x_train examples have shape {a['x_train'].shape[1:]} but "
                        f"x_test examples {a['x_test'].shape[1:]}")
    return _dataset(a["x_train"], a["y_train"], a["x_test"], a["y_test"], Path(path).stem)


def load_dataset(name: str, data_dir=None, path=None) -> Dataset:
    """Loads a data set by name, one of :data:`DATASETS`. ``data_dir`` is for fashion-mnist
    (optional) and mnist (required), ``path`` for npz (required). Raises DataError for an
    unknown name or a missing or unused argument."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    takes = {"fashion-mnist": "data_dir", "mnist": "data_dir", "npz": "path"}.get(name)
    for arg, value in (("data_dir", data_dir), ("path", path)):
        if value is not None and arg != takes:
            raise DataError(f"{name}: takes no {arg} (given {value!r})")
    if name == "npz" and path is None:
        raise DataError("npz: no path given; pass an .npz file with x_train, y_train, x_test, "
                        "y_test")
    loaders = {"digits": load_digits, "fashion-mnist": lambda: load_fashion_mnist(data_dir),
               "mnist": lambda: load_mnist(data_dir), "npz": lambda: load_npz(path)}
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
      DataError: the file is missing, unreadable, not a ``.npy`` array (an ``.npz`` archive, a
        pickle) or holds objects; the message names the file.
    """
    where = Path(path).absolute()
    try:
        with where.open("rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":  # np.load would try pickle
            raise ValueError(f"it starts with {magic!r}, not the .npy magic b'\\x93NUMPY'")
        x = np.load(where, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DataError(f"{where}: cannot read as a .npy array: {reason}") from None
    if not isinstance(x, np.ndarray):
        x.close()
        raise DataError(f"{where}: an .npz archive, expected a single .npy array")
    return x
