"""Bounded reads: a FIFO or a device (``/dev/zero``) in place of a file is refused at once,
sizes are checked against headers and manifests before reading, and a gzip bomb behind an
honest-looking IDX header costs no more memory than the header describes."""

import gzip
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from adv_helpers import (FAST, bounded_cli, digests, make_fifo, one_line_error, refused,
                         within)
from jaxnet import tensorfile
from jaxnet.app.cli import main
from jaxnet.checkpoint import latest_checkpoint
from jaxnet.data import DataError, load_idx_dir, read_idx
from jaxnet.run_manifest import MANIFEST_FILE, write_run_manifest

NOT_REGULAR = {"fifo": "a FIFO, not a regular file",
               "zero": "a character device, not a regular file"}


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A run killed after its last checkpoint: checkpoints, no params, a manifest of its
    config only."""
    out = tmp_path_factory.mktemp("adv_unfinished") / "run"
    assert main(["train", *FAST, "--checkpoint-every", "1", "--out", str(out)]) == 0
    (out / "params.safetensors").unlink()
    write_run_manifest(out, ["config.json"])
    return out


def special(path, kind: str):
    """Makes ``path`` a FIFO, or a symbolic link to ``/dev/zero``."""
    if kind == "fifo":
        return make_fifo(path)
    os.symlink("/dev/zero", path)
    return path


def replace_with(path, kind: str):
    path.unlink()
    special(path, kind)


def copied(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_checkpoint_tensor_file_that_is_not_a_regular_file_is_refused(unfinished_run, tmp_path,
                                                                        capsys, kind):
    out = copied(unfinished_run, tmp_path)
    tensors = latest_checkpoint(out / "checkpoints") / "state.safetensors"
    replace_with(tensors, kind)
    before = digests(out)
    if kind == "fifo":
        with within(60):
            refused(["train", "--resume", out], capsys, tensors, NOT_REGULAR[kind])
    else:  # an unbounded read would exhaust the capped subprocess, not the machine
        done = bounded_cli(["train", "--resume", out])
        assert done.returncode == 2, done.stderr[-2000:]
        one_line_error(done.stderr, tensors, NOT_REGULAR[kind])
    assert digests(out) == before


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("name", ["params.safetensors", MANIFEST_FILE])
def test_a_run_file_that_is_not_a_regular_file_is_refused(finished_run, tmp_path, capsys, kind,
                                                          name):
    out = copied(finished_run, tmp_path)
    replace_with(out / name, kind)
    before = digests(out)
    with within(60):
        refused(["eval", out], capsys, out / name, NOT_REGULAR[kind])
    assert digests(out) == before


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_an_unverified_params_file_is_refused_unless_regular(tmp_path, kind):
    params = tmp_path / "params.safetensors"
    special(params, kind)
    with within(60), pytest.raises(ValueError, match=f"{params}: {NOT_REGULAR[kind]}"):
        tensorfile.load_params(params)
    with within(60), pytest.raises(ValueError, match=f"{params}: {NOT_REGULAR[kind]}"):
        tensorfile.load_metadata(params)


def test_a_params_file_shorter_than_its_header_says_is_refused_before_reading(finished_run,
                                                                              tmp_path):
    params = tmp_path / "params.safetensors"
    params.write_bytes((finished_run / "params.safetensors").read_bytes()[:-100])
    size = params.stat().st_size
    with pytest.raises(ValueError, match=rf"{params}: not a readable safetensors file \(its "
                                         rf"header describes {size + 100} bytes, the file has "
                                         rf"{size}\)"):
        tensorfile.load_params(params)
    params.write_bytes(b"\xff" * 8 + b"{}")  # a header length beyond the file
    with pytest.raises(ValueError, match="its header length .* does not fit its 10 bytes"):
        tensorfile.load_params(params)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_predict_refuses_an_input_that_is_not_a_regular_file(finished_run, tmp_path, capsys,
                                                            kind):
    source = special(tmp_path / "x.npy", kind)
    output = tmp_path / "p.npy"
    before = digests(finished_run)
    with within(60):
        refused(["predict", finished_run, "--input", source, "--output", output,
                 "--no-progress"], capsys, source, NOT_REGULAR[kind])
    assert not output.exists() and digests(finished_run) == before


def test_a_data_file_that_is_a_fifo_is_refused_and_leaves_no_run_directory(tmp_path, capsys):
    data = make_fifo(tmp_path / "data.npz")
    out = tmp_path / "new" / "run"
    with within(60):
        refused(["train", *FAST, "--dataset", "npz", "--data", data, "--out", out], capsys, data,
                NOT_REGULAR["fifo"])
    assert not (tmp_path / "new").exists()


# --- gzip bombs ---------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_dir(directory, train_images: bytes | None = None):
    """Four small IDX files (gzipped); ``train_images`` replaces the training images file."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": idx_bytes(rng.integers(0, 255, (30, 28, 28))),
             "train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, 30)),
             "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 255, (10, 28, 28))),
             "t10k-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, 10))}
    for name, data in files.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(data))
    if train_images is not None:
        (directory / "train-images-idx3-ubyte.gz").write_bytes(train_images)
    return directory


BOMB_BYTES = 8 << 20  # what the bomb decompresses to, far beyond its header's 30 images


def bomb() -> bytes:
    """A gzipped IDX file whose header describes 30 images of 28x28 (23,536 bytes) followed by
    8 MiB of zeros: about 8 KiB compressed."""
    return gzip.compress(idx_bytes(np.zeros((30, 28, 28))) + bytes(BOMB_BYTES), 9)


@pytest.mark.parametrize("rows", [None, slice(0, 30)])
def test_a_gzip_bomb_is_refused_after_reading_what_its_header_describes(tmp_path, rows):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bomb())
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"{path}: trailing bytes: shape \\(30, 28, 28\\)"):
            read_idx(path, rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BOMB_BYTES // 8, f"{peak} bytes at the peak for a header of 23,536"


def test_a_gzip_header_claiming_more_than_the_file_can_hold_is_refused_keeping_nothing(tmp_path):
    path = tmp_path / "claims.gz"  # 784 MB claimed, 8 MiB there, about 8 KiB compressed
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (10**6, 28, 28))
    path.write_bytes(gzip.compress(header + bytes(BOMB_BYTES), 9))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"{path}: truncated: shape \\(1000000, 28, 28\\) "
                                            f"of uint8 needs 784000016 bytes, the file has "
                                            f"{16 + BOMB_BYTES}"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BOMB_BYTES // 2, f"{peak} bytes at the peak"


def test_train_on_a_gzip_bomb_is_refused_naming_the_file(tmp_path, capsys):
    data = mnist_dir(tmp_path / "mnist", bomb())
    assert load_idx_dir(mnist_dir(tmp_path / "honest"), "mnist").x_train.shape == (30, 28, 28, 1)
    before, out = digests(data), tmp_path / "run"
    refused(["train", *FAST, "--dataset", "mnist", "--data-dir", data, "--out", out], capsys,
            data / "train-images-idx3-ubyte.gz", "trailing bytes")
    assert digests(data) == before and not out.exists()
