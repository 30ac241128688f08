"""Numbers too large, memory running out and absurd class counts give one line and exit 2."""

import numpy as np
import pytest

from adv_helpers import FAST, digests, one_line_error, refused
from jaxnet.app import cli
from jaxnet.app.cli import main


@pytest.mark.parametrize("command", [["train"], ["sweep", "--seeds", "1"]])
def test_a_seed_beyond_64_bits_names_the_flag(tmp_path, capsys, command):
    out = tmp_path / "out"
    refused([*command, *FAST, "--seed", "99999999999999999999999", "--out", out], capsys,
            "--seed", "99999999999999999999999")
    assert not out.exists()


@pytest.mark.parametrize("command", [["train"], ["sweep", "--seeds", "1"], ["summary"]])
def test_a_layer_too_wide_for_any_memory_names_the_flag(tmp_path, capsys, command):
    out = ["--out", tmp_path / "out"] if command[0] != "summary" else []
    err = refused([*command, "--hidden", "4294967296", *out], capsys, "--hidden sizes",
                  "4294967296")
    assert "at most 16777216" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error, shown", [
    (MemoryError(), "out of memory (with --hidden 8): MemoryError"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes."), "out of memory"),
    (OverflowError("Python int too large to convert to C long"), "a number is too large"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
])
def test_resource_errors_become_one_line(monkeypatch, capsys, tmp_path, error, shown):
    def fail(args, console):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "train", fail)
    assert main(["train", "--hidden", "8", "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys.readouterr().err, shown)


def test_other_runtime_errors_are_bugs_and_keep_their_traceback(monkeypatch, tmp_path):
    def fail(args, console):
        raise RuntimeError("an internal error")

    monkeypatch.setitem(cli.COMMANDS, "train", fail)
    with pytest.raises(RuntimeError, match="an internal error"):
        main(["train", "--out", str(tmp_path / "r")])


@pytest.mark.parametrize("y_train, y_test, shown", [
    ([0, 1, 100000], [0], "100000"),   # beyond the absolute bound
    ([0, 1, 45], [0], "45"),           # more than 10x the 4 examples
])
def test_absurd_class_counts_are_refused_naming_the_value_and_file(tmp_path, capsys, y_train,
                                                                    y_test, shown):
    data = tmp_path / "labels.npz"
    np.savez(data, x_train=np.zeros((len(y_train), 3), np.float32),
             y_train=np.asarray(y_train, np.int64), x_test=np.zeros((len(y_test), 3), np.float32),
             y_test=np.asarray(y_test, np.int64))
    before, out = digests(data), tmp_path / "out"
    err = refused(["train", *FAST, "--dataset", "npz", "--data", data, "--out", out], capsys,
                  data, shown)
    assert "largest label" in err
    assert digests(data) == before and not out.exists()


def test_ten_classes_from_a_few_examples_are_fine(tmp_path, capsys, rng):
    data = tmp_path / "few.npz"
    np.savez(data, x_train=rng.normal(size=(3, 3)).astype(np.float32),
             y_train=np.asarray([0, 9, 2]), x_test=rng.normal(size=(1, 3)).astype(np.float32),
             y_test=np.asarray([1]))
    assert main(["train", *FAST, "--dataset", "npz", "--data", str(data), "--batch-size", "3",
                 "--validation-split", "0", "--out", str(tmp_path / "out")]) == 0
