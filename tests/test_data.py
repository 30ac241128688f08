"""Tests for jaxnet.data: IDX and npz readers, their validation, the digits split, dispatch.

Every file is built here in tmp_path; no test needs a downloaded data set.
"""

import gzip
import io
import os
import re
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxnet import data
from jaxnet.data import DataError

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}


def idx_bytes(array, code=None, ndim=None):
    """The IDX encoding of ``array``; ``code`` and ``ndim`` override the header."""
    array = np.asarray(array)
    code = IDX_CODES[array.dtype.type] if code is None else code
    ndim = array.ndim if ndim is None else ndim
    dims = np.array(array.shape, ">i4").tobytes()
    return bytes([0, 0, code, ndim]) + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, content: bytes, gz=False):
    path.write_bytes(gzip.compress(content, mtime=0) if gz else content)
    return path


def in_message(path):
    """A regex matching the full path of ``path`` anywhere in a message."""
    return re.escape(str(path.absolute()))


def write_idx_dir(directory, n_train=12, n_test=5, gz=True, dotted=False, labels_max=9):
    rng = np.random.default_rng(0)
    directory.mkdir(exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 4, 3), dtype=np.uint8)
        labels = (np.arange(n) % (labels_max + 1)).astype(np.uint8)
        for kind, array, rank in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}{'.' if dotted else '-'}idx{rank}-ubyte" + (".gz" if gz else "")
            write(directory / name, idx_bytes(array), gz)
    return directory


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_read_idx_round_trip(tmp_path, rng, dtype, gz):
    array = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
    out = data.read_idx(write(tmp_path / "a.idx", idx_bytes(array), gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0] = 0  # writable: a copy, not a view of the file's bytes


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    gz_named_raw = write(tmp_path / "raw.gz", idx_bytes(array))
    raw_named_gz = write(tmp_path / "gz.idx", idx_bytes(array), gz=True)
    np.testing.assert_array_equal(data.read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(data.read_idx(raw_named_gz), array)


def test_read_idx_empty_dimension(tmp_path):
    out = data.read_idx(write(tmp_path / "e", idx_bytes(np.zeros((0, 5), np.uint8))))
    assert out.shape == (0, 5)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("content, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file: magic number 01 00 08 01"),
    (b"", r"magic number \(empty file\)"),
    (idx_bytes(np.zeros(3, np.uint8), code=0x0A), "unknown IDX type code 0x0A"),
    (b"\x00\x00\x08\x00", "ndim 0"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated header: 2 dimensions need 12 bytes, the "
                                          "file has 8"),
    (idx_bytes(np.zeros((2, 3), np.int16))[:-1], "truncated: .*needs 24 bytes, the file has 23"),
    (idx_bytes(np.zeros(4, np.uint8)) + b"junk", "trailing bytes: .*needs 12 bytes, the file has "
                                                 "16"),
    (b"\x00\x00\x08\x01\xff\xff\xff\xff", r"truncated: shape \(4294967295,\) of uint8 needs "
                                          "4294967303 bytes, the file has 8"),
])
def test_read_idx_errors(tmp_path, content, message, gz):
    path = write(tmp_path / "bad-idx1-ubyte", content, gz)
    with pytest.raises(DataError, match=in_message(path) + ".*" + message):
        data.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    path = write(tmp_path / "c.gz", good[:len(good) // 2])
    with pytest.raises(DataError, match=in_message(path) + ".*cannot read"):
        data.read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match=in_message(tmp_path / "nope") + ".*cannot read"):
        data.read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- IDX directories


@pytest.mark.parametrize("gz, dotted", [(True, False), (False, False), (False, True), (True, True)])
def test_load_idx_dir(tmp_path, gz, dotted):
    ds = data.load_idx_dir(write_idx_dir(tmp_path / "d", gz=gz, dotted=dotted), "toy")
    assert ds.x_train.shape == (12, 4, 3, 1) and ds.x_test.shape == (5, 4, 3, 1)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.num_classes == 10 and ds.name == "toy"
    raw = data.read_idx(next((tmp_path / "d").glob("train-images*")))
    np.testing.assert_allclose(ds.x_train[..., 0], raw / 255, rtol=1e-6)


def test_load_idx_dir_num_classes_from_labels(tmp_path):
    assert data.load_idx_dir(write_idx_dir(tmp_path, labels_max=3), "toy").num_classes == 4


def test_load_idx_dir_missing_directory(tmp_path):
    with pytest.raises(DataError, match=in_message(tmp_path / "nope") + " does not exist; to get"):
        data.load_idx_dir(tmp_path / "nope", "toy")


def test_load_idx_dir_lists_missing_files(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte\[\.gz\], "
                                        r"t10k-labels-idx1-ubyte\[\.gz\]; to get the data"):
        data.load_idx_dir(tmp_path, "toy")


@pytest.mark.parametrize("file, array, message", [
    ("train-images-idx3-ubyte", np.zeros((12, 12), np.uint8), r"3-D uint8 array, got shape \(12, "),
    ("train-images-idx3-ubyte", np.zeros((12, 4, 3), np.float32), "3-D uint8 array, got .*float32"),
    ("t10k-labels-idx1-ubyte", np.zeros((5, 1), np.uint8), r"1-D uint8 array, got shape \(5, 1\)"),
    ("t10k-labels-idx1-ubyte", np.zeros(5, np.int32), "1-D uint8 array, got .* int32"),
])
def test_load_idx_dir_wrong_array(tmp_path, file, array, message):
    write_idx_dir(tmp_path, gz=False)
    path = write(tmp_path / file, idx_bytes(array))
    with pytest.raises(DataError, match=in_message(path) + ".*" + message):
        data.load_idx_dir(tmp_path, "toy")


def test_load_idx_dir_count_mismatch(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    labels = write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)))
    images = tmp_path / "train-images-idx3-ubyte"
    with pytest.raises(DataError, match=in_message(images) + " has 12 images but "
                       + in_message(labels) + " has 11 labels"):
        data.load_idx_dir(tmp_path, "toy")


def test_load_idx_dir_image_size_mismatch(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    path = write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((5, 4, 4), np.uint8)))
    with pytest.raises(DataError, match=in_message(path) + r".*\(4, 4\).*\(4, 3\)"):
        data.load_idx_dir(tmp_path, "toy")


def test_load_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"apt-get update && apt-get install dataset-fashion-mnist"
                                        r".*`data_dir`"):
        data.load_fashion_mnist()


def test_load_fashion_mnist_and_mnist_from_directory(tmp_path):
    write_idx_dir(tmp_path)
    assert data.load_fashion_mnist(tmp_path).name == "fashion-mnist"
    assert data.load_mnist(tmp_path).name == "mnist"


def test_load_mnist_needs_a_directory():
    with pytest.raises(DataError, match="mnist: no data directory given.*`data_dir`"):
        data.load_mnist(None)


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range():
    ds = data.load_digits()
    assert ds.x_train.shape == (1438, 8, 8, 1) and ds.x_test.shape == (359, 8, 8, 1)
    assert ds.y_train.shape == (1438,) and ds.y_test.shape == (359,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert np.all(ds.x_train * 16 == np.round(ds.x_train * 16))  # counts 0..16 scaled by 1/16
    assert ds.num_classes == 10 and ds.name == "digits"
    assert set(np.unique(ds.y_test)) == set(range(10))


def test_digits_sizes_match_docstring():
    ds = data.load_digits()
    assert f"**{len(ds.y_train)} training and {len(ds.y_test)} test examples**" in " ".join(
        data.load_digits.__doc__.split())


def test_digits_split_is_stratified():
    ds = data.load_digits()
    for c in range(10):
        n_train, n_test = np.sum(ds.y_train == c), np.sum(ds.y_test == c)
        assert abs(n_train - 0.8 * (n_train + n_test)) <= 1, c


def test_digits_split_is_deterministic_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    for x, y in zip(a[:4], b[:4]):
        np.testing.assert_array_equal(x, y)
    train = {row.tobytes() for row in a.x_train}
    # Some digits images are exact duplicates, so a few collisions are possible; most must differ.
    assert sum(row.tobytes() in train for row in a.x_test) < 10


# ---------------------------------------------------------------- npz


def npz_arrays(**overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (6, 3, 2), dtype=np.uint8),
              "y_train": np.array([0, 1, 2, 0, 1, 2]),
              "x_test": rng.integers(0, 256, (4, 3, 2), dtype=np.uint8),
              "y_test": np.array([2, 1, 0, 4])}
    arrays.update(overrides)
    return {k: v for k, v in arrays.items() if v is not None}


def save_npz(path, compressed=False, **overrides):
    (np.savez_compressed if compressed else np.savez)(path, **npz_arrays(**overrides))
    return path


def test_load_npz_uint8_scaled(tmp_path):
    ds = data.load_npz(save_npz(tmp_path / "toy.npz"))
    arrays = npz_arrays()
    assert ds.x_train.shape == (6, 3, 2) and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_test, arrays["x_test"] / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 5 and ds.name == "toy"


def test_load_npz_float_kept(tmp_path):
    x = np.linspace(-3, 3, 6 * 5).reshape(6, 5)
    ds = data.load_npz(save_npz(tmp_path / "f.npz", compressed=True, x_train=x,
                                x_test=x[:4].astype(np.float16)))
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    np.testing.assert_allclose(ds.x_train, x, rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"y_train": None, "x_test": None}, "missing arrays y_train, x_test; it has x_train, y_test"),
    ({"y_train": np.array([0, 1])}, "x_train has 6 examples but y_train has 2 labels"),
    ({"x_test": np.zeros((0, 3, 2)), "y_test": np.zeros(0, int)}, "x_test has 0 examples"),
    ({"y_test": np.array([0.0, 1, 2, 3])}, "y_test must be a 1-D integer array.*float64"),
    ({"y_test": np.zeros((4, 1), int)}, r"y_test must be a 1-D integer array.*\(4, 1\)"),
    ({"y_train": np.array([0, 1, -1, 0, 1, 2])}, r"y_train labels must be in \[0, 2\*\*31\), found "
                                                 r"-1..2"),
    ({"x_train": np.full((6, 3, 2), "a")}, "x_train must be a numeric.*<U1"),
    ({"x_train": np.zeros((6, 3, 2), bool)}, "x_train must be a numeric.*bool"),
    ({"x_test": np.full((4, 3, 2), np.nan)}, "x_test has NaN or infinite values"),
    ({"x_test": np.full((4, 3, 2), 1e300)}, r"x_test has NaN or infinite values \(in float32\)"),
    ({"x_test": np.zeros((4, 2, 3), np.uint8)}, r"x_train examples have shape \(3, 2\) but x_test"
                                                r" examples \(2, 3\)"),
])
def test_load_npz_errors(tmp_path, overrides, message):
    path = save_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=in_message(path) + ": " + message):
        data.load_npz(path)


def test_load_npz_object_array(tmp_path):
    path = save_npz(tmp_path / "obj.npz", y_test=np.array([0, "a", None, 1], dtype=object))
    with pytest.raises(DataError, match=in_message(path) + ": cannot read as .npz.*allow_pickle"):
        data.load_npz(path)


def test_load_npz_encrypted_member(tmp_path):
    # zipfile raises RuntimeError for a member flagged as encrypted (found by fuzzing).
    content = bytearray(npz_bytes(compressed=False))
    central = content.index(b"PK\x01\x02")  # the first central directory entry
    content[central + 8] |= 1  # its "encrypted" flag bit
    path = write(tmp_path / "enc.npz", bytes(content))
    with pytest.raises(DataError, match=in_message(path) + ": cannot read as .npz: RuntimeError"):
        data.load_npz(path)


def test_load_npz_not_an_archive(tmp_path):
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match=in_message(npy) + ": not an .npz archive"):
        data.load_npz(npy)
    text = write(tmp_path / "text.npz", b"hello")
    with pytest.raises(DataError, match=in_message(text) + ": cannot read as .npz"):
        data.load_npz(text)
    with pytest.raises(DataError, match=in_message(tmp_path / "nope.npz") + ": cannot read"):
        data.load_npz(tmp_path / "nope.npz")


# ---------------------------------------------------------------- dispatch and standardize


def test_load_dataset_dispatch(tmp_path):
    assert data.load_dataset("digits").name == "digits"
    assert data.load_dataset("npz", path=save_npz(tmp_path / "mine.npz")).name == "mine"
    assert data.load_dataset("mnist", data_dir=write_idx_dir(tmp_path / "m")).name == "mnist"
    assert data.load_dataset("fashion-mnist", data_dir=tmp_path / "m").name == "fashion-mnist"


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "cifar"}, "unknown data set 'cifar'; choose one of digits, fashion-mnist, mnist, "
                        "npz"),
    ({"name": "npz"}, "npz: no path given"),
    ({"name": "mnist"}, "mnist: no data directory given"),
    ({"name": "digits", "data_dir": "/tmp"}, "digits: takes no data_dir (given '/tmp')"),
    ({"name": "mnist", "data_dir": "/tmp", "path": "x.npz"}, "mnist: takes no path"),
])
def test_load_dataset_errors(kwargs, message):
    with pytest.raises(DataError, match=re.escape(message)):
        data.load_dataset(**kwargs)


def test_standardize(rng):
    x_train = rng.normal(3.0, 2.0, (50, 4)).astype(np.float32)
    x_test = rng.normal(3.0, 2.0, (20, 4)).astype(np.float32)
    a, b, stats = data.standardize(x_train, x_test)
    assert a.dtype == b.dtype == np.float32 and a.shape == x_train.shape
    np.testing.assert_allclose([a.mean(), a.std()], [0, 1], atol=1e-5)
    train64 = x_train.astype(np.float64)
    expected = (x_test - train64.mean()) / train64.std()
    np.testing.assert_allclose(b, expected, rtol=1e-5)
    np.testing.assert_allclose([stats["mean"], stats["std"]], [train64.mean(), train64.std()], rtol=1e-6)


@pytest.mark.parametrize("x_train, std", [(np.ones((4, 3)), "0.0"), (np.zeros((0, 3)), "0.0"),
                                          (np.array([1.0, np.inf]), "nan")])
def test_standardize_constant_empty_or_not_finite(x_train, std):
    with pytest.raises(DataError, match=f"standard deviation {std}, expected > 0"):
        data.standardize(x_train, x_train)


# ---------------------------------------------------------------- fuzzing: only DataError escapes

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mutations(draw, base: bytes):
    """``base`` with a few random byte flips, overwrites, a truncation and/or an appendix."""
    content = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        if content:
            i = draw(st.integers(0, len(content) - 1))
            content[i] = draw(st.integers(0, 255)) if draw(st.booleans()) else content[i] ^ (
                1 << draw(st.integers(0, 7)))
    if draw(st.booleans()):
        content = content[:draw(st.integers(0, len(content)))]
    if draw(st.integers(0, 4)) == 0:
        content += draw(st.binary(max_size=8))
    return bytes(content)


def only_data_errors(load, path, content: bytes):
    path.write_bytes(content)
    try:
        load(path)
    except DataError:
        pass


IDX = idx_bytes(np.arange(24, dtype=np.int16).reshape(2, 3, 4))


@FUZZ
@given(content=st.binary(max_size=64))
def test_fuzz_read_idx_random_bytes(tmp_path, content):
    only_data_errors(data.read_idx, tmp_path / "r", content)
    only_data_errors(data.read_idx, tmp_path / "g", gzip.compress(content))


@FUZZ
@given(content=mutations(IDX), gz=st.booleans())
def test_fuzz_read_idx_mutated(tmp_path, content, gz):
    only_data_errors(data.read_idx, tmp_path / "m", gzip.compress(content) if gz else content)


@FUZZ
@given(content=mutations(gzip.compress(IDX, mtime=0)))
def test_fuzz_read_idx_mutated_gzip_stream(tmp_path, content):
    only_data_errors(data.read_idx, tmp_path / "z", content)


@FUZZ
@given(content=mutations(IDX) | mutations(gzip.compress(IDX, mtime=0)), gz=st.booleans(),
       part=st.sampled_from([(0, 1), (1, 2), (0, 0), (1, 1)]))
def test_fuzz_read_idx_rows(tmp_path, content, gz, part):
    """Rows of a damaged file: a DataError, or a bad range's IndexError, nothing else."""
    rows = lambda n: slice(n * part[0] // 2, n * part[1] // 2)  # first or last half, or empty
    try:
        only_data_errors(lambda p: data.read_idx(p, rows), tmp_path / "m",
                         gzip.compress(content) if gz else content)
    except IndexError as error:
        assert "are not within its" in str(error)


def npz_bytes(compressed):
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **npz_arrays())
    return buffer.getvalue()


@FUZZ
@given(content=st.binary(max_size=64) | mutations(npz_bytes(False)) | mutations(npz_bytes(True)))
def test_fuzz_load_npz(tmp_path, content):
    only_data_errors(data.load_npz, tmp_path / "f.npz", content)


@FUZZ
@given(content=mutations(npz_bytes(False)) | mutations(npz_bytes(True)),
       rows=st.sampled_from([slice(0, 3), slice(3, 6), slice(2, 2)]))
def test_fuzz_load_npz_rows(tmp_path, content, rows):
    try:
        only_data_errors(lambda p: data.load_npz(p, rows), tmp_path / "f.npz", content)
    except IndexError as error:
        assert "are not within its" in str(error)


ANY_SHAPE = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)


@st.composite
def npz_contents(draw):
    """Arrays for the four keys, mostly well-formed so that every validation step is reached."""
    example = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    x_dtype = draw(st.sampled_from(["u1", "i2", "u8", "f2", "f4", "f8", "c8", "?", "U2", "M8[s]"]))
    y_dtype = draw(st.sampled_from(["u1", "i1", "i8", "u8", "f4", "?"]))
    labels = {"i": st.integers(-1, 4), "u": st.integers(0, 4)}.get(np.dtype(y_dtype).kind)
    arrays = {}
    for split in ("train", "test"):
        n = draw(st.integers(0, 3))
        x_shape = (n, *example) if draw(st.integers(0, 4)) else draw(ANY_SHAPE)
        y_shape = (n,) if draw(st.integers(0, 4)) else draw(ANY_SHAPE)
        arrays["x_" + split] = draw(hnp.arrays(x_dtype, x_shape))
        arrays["y_" + split] = draw(hnp.arrays(y_dtype, y_shape, elements=labels))
    return arrays


@FUZZ
@given(arrays=npz_contents())
def test_fuzz_load_npz_arrays(tmp_path, arrays):
    """Any well-formed archive gives a valid Dataset or a DataError, never a warning or a crash."""
    path = tmp_path / "arrays.npz"
    np.savez(path, **arrays)
    try:
        ds = data.load_npz(path)
    except DataError:
        return
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:] == arrays["x_train"].shape[1:]
    assert np.isfinite(ds.x_train).all() and len(ds.x_train) == len(ds.y_train) > 0
    assert 0 <= ds.y_train.min() and ds.y_train.max() < ds.num_classes


# ---------------------------------------------------------------- reading only some rows

RANGES = [slice(0, 3), slice(3, 7), slice(7, 10), slice(4, 4), slice(10, 10)]  # first .. empty


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("rows", RANGES)
def test_read_idx_rows_equal_a_slice_of_the_whole(tmp_path, rng, gz, rows):
    images = rng.integers(0, 256, (10, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 10).astype(np.uint8)
    for name, array in (("images", images), ("labels", labels)):
        path = write(tmp_path / name, idx_bytes(array), gz)
        part = data.read_idx(path, rows)
        assert part.dtype == np.uint8 and part.shape == array[rows].shape
        np.testing.assert_array_equal(part, data.read_idx(path)[rows])
    part[...] = 0  # writable, like a whole read


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rows_of_multibyte_values_and_a_function_of_the_count(tmp_path, rng, gz):
    array = (rng.normal(size=(7, 2, 3)) * 1000).astype(np.int16)  # big-endian in the file
    path = write(tmp_path / "a", idx_bytes(array), gz)
    part = data.read_idx(path, lambda n: slice(n - 3, n))
    assert part.dtype == np.int16 and part.dtype.isnative
    np.testing.assert_array_equal(part, array[4:])
    np.testing.assert_array_equal(data.read_idx(path, slice(None, 2)), array[:2])


@pytest.mark.parametrize("rows, error, message", [
    (slice(-1, 3), IndexError, r"rows -1:3 are not within its 10 rows; expected 0 <= start <= "
                               r"stop <= 10"),
    (slice(8, 11), IndexError, "rows 8:11 are not within its 10 rows"),
    (slice(5, 4), IndexError, "rows 5:4 are not within its 10 rows"),
    (slice(0, 4, 2), TypeError, r"rows must be a contiguous slice start:stop, got "
                                r"slice\(0, 4, 2\)"),
    (3, TypeError, "rows must be a contiguous slice start:stop, got 3"),
    (lambda n: slice(0, n + 1), IndexError, "rows 0:11 are not within its 10 rows"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rows_rejects_bad_ranges(tmp_path, gz, rows, error, message):
    path = write(tmp_path / "a", idx_bytes(np.zeros((10, 2), np.uint8)), gz)
    with pytest.raises(error, match=in_message(path) + ": " + message):
        data.read_idx(path, rows)


@pytest.mark.parametrize("rows", [slice(0, 1), slice(9, 10), slice(0, 0)])
def test_read_idx_rows_checks_a_raw_file_whole_from_its_size(tmp_path, rows):
    """Truncated or too long anywhere: found from the header and the size, whatever the rows."""
    content = idx_bytes(np.zeros((10, 2), np.uint8))  # 12 + 20 bytes
    short, long = write(tmp_path / "short", content[:-1]), write(tmp_path / "long", content + b"x")
    message = r": truncated: shape \(10, 2\) of uint8 needs 32 bytes, the file has 31"
    with pytest.raises(DataError, match=in_message(short) + message):
        data.read_idx(short, rows)
    with pytest.raises(DataError, match=in_message(long) + ": trailing bytes: .*the file has 33"):
        data.read_idx(long, rows)


def test_read_idx_rows_of_a_damaged_gzip_file(tmp_path):
    """gzip cannot seek: damage is found when the rows read reach it."""
    content = idx_bytes(np.arange(20, dtype=np.uint8).reshape(10, 2))
    short = write(tmp_path / "short.gz", content[:-3], gz=True)
    np.testing.assert_array_equal(data.read_idx(short, slice(0, 4)), np.arange(8).reshape(4, 2))
    message = r": truncated: shape \(10, 2\) of uint8 needs 32 bytes, the file has 29"
    with pytest.raises(DataError, match=in_message(short) + message):
        data.read_idx(short, slice(8, 10))
    long = write(tmp_path / "long.gz", content + b"x", gz=True)  # the last rows look past them
    with pytest.raises(DataError, match=in_message(long) + ": trailing bytes: .*the file has 33"):
        data.read_idx(long, slice(9, 10))
    cut = write(tmp_path / "cut.gz", gzip.compress(content)[:-12])  # the stream itself ends early
    with pytest.raises(DataError, match=in_message(cut) + ": cannot read: EOFError"):
        data.read_idx(cut, slice(9, 10))
    for content, message in ((b"\x01\x00\x08\x01", "not an IDX file"), (b"\0\0\x08\x02\0\0",
                                                                        "truncated header")):
        path = write(tmp_path / "bad.gz", content, gz=True)
        with pytest.raises(DataError, match=in_message(path) + ": " + message):
            data.read_idx(path, slice(0, 0))


def bytes_read_by_this_process() -> int:
    """``rchar`` of /proc/self/io: every byte this process has read through a read call."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_read_idx_rows_reads_only_the_rows_from_a_raw_file(tmp_path, rng):
    array = rng.integers(0, 256, (2048, 32, 32), dtype=np.uint8)  # 2 MiB
    path = write(tmp_path / "big", idx_bytes(array))
    before = bytes_read_by_this_process()
    part = data.read_idx(path, slice(1000, 1010))  # 10 KiB
    rows_only = bytes_read_by_this_process() - before
    whole = data.read_idx(path)
    whole_file = bytes_read_by_this_process() - before - rows_only
    np.testing.assert_array_equal(part, whole[1000:1010])
    assert whole_file > 2 * 2**20  # the measure sees a whole read ...
    assert rows_only < 2**18, rows_only  # ... and the rows' 10 KiB, with buffering (~14 KiB)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("rows", [slice(0, 2), slice(2, 5), slice(5, 6), slice(3, 3)])
def test_load_npz_rows_equal_a_slice_of_the_whole(tmp_path, compressed, rows):
    path = save_npz(tmp_path / "toy.npz", compressed)
    whole, part = data.load_npz(path), data.load_npz(path, train_rows=rows)
    for name in ("x_train", "y_train"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[rows])
        assert getattr(part, name).dtype == getattr(whole, name).dtype
    np.testing.assert_array_equal(part.x_test, whole.x_test)
    assert (part.train_rows, part.train_examples, part.num_train) == (rows, 6, 6)
    assert whole.train_rows is None and whole.num_train == 6 and part.name == "toy"


def test_load_npz_rows_of_float_fortran_and_version_2_members(tmp_path, rng):
    x = rng.normal(size=(7, 3, 2))
    path = tmp_path / "f.npz"
    np.savez(path, x_train=np.asfortranarray(x), y_train=np.arange(7), x_test=x[:2],
             y_test=np.arange(2))
    np.testing.assert_allclose(data.load_npz(path, slice(2, 6)).x_train, x[2:6], rtol=1e-6)
    with zipfile.ZipFile(path, "w") as archive:  # .npy format 2.0 (4-byte header length)
        for name, array in (("x_train", x), ("y_train", np.arange(7)), ("x_test", x[:2]),
                            ("y_test", np.arange(2))):
            with archive.open(name + ".npy", "w") as member:
                np.lib.format.write_array(member, array, version=(2, 0))
    np.testing.assert_allclose(data.load_npz(path, slice(5, 7)).x_train, x[5:], rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"y_train": np.array([0, 1])}, "x_train has 6 examples but y_train has 2 labels"),
    ({"x_train": np.zeros((0, 3, 2)), "y_train": np.zeros(0, int)}, "x_train has 0 examples"),
    ({"x_train": np.array(3.0)}, r"x_train must be a numeric .*shape \(\) of float64"),
    ({"y_train": np.zeros(6)}, "y_train must be a 1-D integer array.*float64"),
    ({"y_train": np.array([0, 1, 2, 0, -1, 2])}, r"y_train labels must be in \[0, 2\*\*31\), "
                                                 r"found -1..2"),
    ({"x_train": np.full((6, 3, 2), np.inf)}, "x_train has NaN or infinite values"),
    ({"y_test": None}, "missing arrays y_test"),
])
def test_load_npz_rows_errors(tmp_path, overrides, message):
    path = save_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=in_message(path) + ": " + message):
        data.load_npz(path, train_rows=slice(3, 6))


def test_load_npz_rows_rejects_bad_ranges_and_damaged_members(tmp_path):
    path = save_npz(tmp_path / "toy.npz")
    with pytest.raises(IndexError, match=in_message(path) + ": x_train: rows 4:7 are not within "
                                                            "its 6 rows"):
        data.load_npz(path, train_rows=slice(4, 7))
    # Large enough that reading the header does not reach the member's end (and its CRC)
    save_npz(path, x_train=np.zeros((2000, 3, 2), np.uint8), y_train=np.zeros(2000, int))
    content = bytearray(path.read_bytes())
    shape = content.index(b"'shape': (2000, 3, 2)")  # in x_train's .npy header
    content[shape:shape + 21] = b"'shape': (2001, 3, 2)"  # more rows than the member holds
    damaged = write(tmp_path / "damaged.npz", bytes(content))
    with pytest.raises(DataError, match=in_message(damaged) + ": cannot read as .npz: .*x_train: "
                                                              "shape \\(2001, 3, 2\\) of uint8 "
                                                              "needs 12134 bytes, the member has "
                                                              "12128"):
        data.load_npz(damaged, train_rows=slice(0, 1))
    with pytest.raises(DataError, match=in_message(tmp_path / "nope.npz") + ": cannot read"):
        data.load_npz(tmp_path / "nope.npz", train_rows=slice(0, 1))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_load_npz_rows_reads_only_the_rows_of_an_uncompressed_member(tmp_path, rng):
    x = rng.integers(0, 256, (2048, 32, 32), dtype=np.uint8)  # 2 MiB
    path = save_npz(tmp_path / "big.npz", x_train=x, y_train=np.arange(2048) % 3,
                    x_test=x[:4], y_test=np.arange(4))
    before = bytes_read_by_this_process()
    part = data.load_npz(path, train_rows=slice(100, 110))
    rows_only = bytes_read_by_this_process() - before  # the test set, zip directory, buffering
    assert rows_only < 2**18, rows_only  # ~58 KiB; the whole file is 2 MiB
    np.testing.assert_array_equal(part.x_train, x[100:110] / np.float32(255))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("rows", [slice(0, 5), slice(5, 12), slice(12, 12)])
def test_load_idx_dir_rows_equal_a_slice_of_the_whole(tmp_path, gz, rows):
    directory = write_idx_dir(tmp_path / "d", gz=gz)
    whole = data.load_idx_dir(directory, "toy")
    part = data.load_dataset("mnist", data_dir=directory, train_rows=rows)
    np.testing.assert_array_equal(part.x_train, whole.x_train[rows])
    np.testing.assert_array_equal(part.y_train, whole.y_train[rows])
    np.testing.assert_array_equal(part.x_test, whole.x_test)
    assert (part.train_rows, part.num_train) == (rows, 12)


def test_load_idx_dir_rows_checks_counts_from_the_headers(tmp_path):
    directory = write_idx_dir(tmp_path / "d", gz=False)
    labels = directory / "train-labels-idx1-ubyte"
    write(labels, idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte has 12 images but "
                                        + in_message(labels) + " has 11 labels"):
        data.load_idx_dir(directory, "toy", train_rows=slice(0, 1))
    write(labels, idx_bytes(np.zeros((12, 1), np.uint8)))
    with pytest.raises(DataError, match=in_message(labels) + r": expected a 1-D uint8 array, got "
                                                             r"shape \(12, 1\) of uint8"):
        data.load_idx_dir(directory, "toy", train_rows=slice(0, 1))
    with pytest.raises(IndexError, match="train-images-idx3-ubyte: rows 0:13 are not within its "
                                         "12 rows"):
        data.load_idx_dir(write_idx_dir(tmp_path / "e", gz=False), "toy", slice(0, 13))


def test_digits_rows_are_sliced_from_the_whole(tmp_path):
    whole = data.load_digits()
    part = data.load_dataset("digits", train_rows=lambda n: slice(n - 10, n))
    np.testing.assert_array_equal(part.x_train, whole.x_train[-10:])
    np.testing.assert_array_equal(part.y_test, whole.y_test)
    assert (part.train_rows, part.num_train, part.num_classes) == (slice(1428, 1438), 1438, 10)
    with pytest.raises(IndexError, match="digits training set: rows 0:1439 are not within"):
        data.load_digits(slice(0, 1439))
