"""``jaxnet predict`` never writes over its input nor into a run directory, and cleans up the
temporary files a killed predict left."""

import os

import numpy as np
import pytest

from adv_helpers import digests, refused
from jaxnet.app.cli import main
from jaxnet.app.rundir import remove_leftovers, temp_pattern
from jaxnet.data import load_digits


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, load_digits().x_test[:20])
    return path


def _predict(run, x, output):
    return ["predict", run, "--input", x, "--output", output, "--no-progress"]


def test_the_output_may_not_be_the_input(finished_run, inputs, capsys):
    before = digests(inputs)
    err = refused(_predict(finished_run, inputs, inputs), capsys, "--output", inputs)
    assert "is the --input file" in err
    assert digests(inputs) == before


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hard link"])
def test_the_output_may_not_be_a_link_to_the_input(finished_run, inputs, tmp_path, capsys, link):
    alias = tmp_path / "alias.npy"
    link(inputs, alias)
    before = digests(inputs)
    refused(_predict(finished_run, inputs, alias), capsys, "--output", alias, "--input")
    assert digests(inputs) == before and alias.exists()


@pytest.mark.parametrize("where", ["p.npy", "checkpoints/p.npy", "params.safetensors"])
def test_the_output_may_not_lie_inside_a_run_directory(finished_run, inputs, capsys, where):
    (finished_run / "checkpoints").mkdir(exist_ok=True)
    before = digests(finished_run)
    err = refused(_predict(finished_run, inputs, finished_run / where), capsys, "--output",
                  finished_run)
    assert "inside the run directory" in err
    assert digests(finished_run) == before
    assert not (finished_run / "p.npy").exists()


def test_the_output_may_not_lie_inside_a_sweep_directory(finished_sweep, inputs, capsys):
    before = digests(finished_sweep)
    refused(_predict(finished_sweep / "best", inputs, finished_sweep / "best" / "p.npy"), capsys,
            "--output", finished_sweep)
    assert digests(finished_sweep) == before


def test_a_killed_predicts_temporary_file_is_removed_by_the_next(finished_run, inputs, tmp_path,
                                                                 capsys):
    left = tmp_path / ".p.npy.k3j_9zq1.tmp"  # the name mkstemp gave the killed predict
    left.write_bytes(b"partial")
    others = [tmp_path / ".q.npy.k3j_9zq1.tmp", tmp_path / ".p.npy.tmp", tmp_path / "p.npy.tmp",
              tmp_path / ".p.npy.TOOLONG12.tmp"]
    for path in others:
        path.write_bytes(b"not jaxnet's")
    assert main([str(a) for a in _predict(finished_run, inputs, tmp_path / "p.npy")]) == 0
    assert np.load(tmp_path / "p.npy").shape == (20, 10)
    assert not left.exists()
    assert all(path.read_bytes() == b"not jaxnet's" for path in others)


def test_the_temporary_name_pattern_is_mkstemps():
    import tempfile

    fd, name = tempfile.mkstemp(prefix=".out.npy.", suffix=".tmp")
    os.close(fd)
    os.unlink(name)
    assert temp_pattern("out.npy").fullmatch(os.path.basename(name))
    assert not temp_pattern("out.npy").fullmatch(".out.npy.tmp")


def test_remove_leftovers_of_a_missing_directory_removes_nothing(tmp_path):
    assert remove_leftovers(tmp_path / "missing", ["p.npy"]) == []
