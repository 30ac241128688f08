"""``jaxnet predict RUN_DIR --input X.npy --output P.npy``: a run's outputs for raw inputs."""

import json
import os

import numpy as np
import pytest

from jaxnet.app.cli import main
from jaxnet.data import load_digits
from jaxnet.inference import predict
from jaxnet.app.run import chosen_record, load_data, read_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--epochs", "2", "--hidden", "32", "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def raw_test(tmp_path_factory):
    """The digits test images as the loader gives them (before standardisation), in a .npy file."""
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, load_digits().x_test)
    return path


def run(argv, capsys):
    status = main(argv)
    return status, capsys.readouterr()


def test_predict_applies_the_runs_standardisation(run_dir, raw_test, tmp_path, capsys):
    status, _ = run(["predict", str(run_dir), "--input", str(raw_test), "--output",
                     str(tmp_path / "p.npy"), "--no-progress", "--batch-size", "100"], capsys)
    assert status == 0
    logits = np.load(tmp_path / "p.npy")
    config, _, net, params = read_run(run_dir)
    standardised = load_data(config)[0]  # what training and evaluation fed the network
    assert logits.shape == (359, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, predict(net, params, standardised.x_test, batch_size=100))
    accuracy = (logits.argmax(-1) == standardised.y_test).mean()
    chosen = chosen_record([json.loads(line) for line in
                            (run_dir / "metrics.jsonl").read_text().splitlines()])
    assert accuracy == pytest.approx(chosen["test_accuracy"], abs=1e-6)


def test_flat_and_channel_free_inputs_and_proba(run_dir, raw_test, tmp_path, capsys):
    x = np.load(raw_test)
    np.save(tmp_path / "flat.npy", x.reshape(len(x), 64))
    np.save(tmp_path / "square.npy", x[..., 0])
    outputs = {}
    for name in ("flat", "square"):
        status, captured = run(["predict", str(run_dir), "--input", str(tmp_path / f"{name}.npy"),
                                "--output", str(tmp_path / f"p_{name}.npy"), "--proba",
                                "--no-progress"], capsys)
        assert status == 0 and "probabilities of shape (359, 10)" in captured.out
        outputs[name] = np.load(tmp_path / f"p_{name}.npy")
    np.testing.assert_array_equal(outputs["flat"], outputs["square"])
    np.testing.assert_allclose(outputs["flat"].sum(-1), 1, rtol=1e-6)


def test_uint8_inputs_are_pixels_scaled_by_1_over_255(run_dir, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "f32.npy", pixels / np.float32(255))
    for name in ("u8", "f32"):
        assert run(["predict", str(run_dir), "--input", str(tmp_path / f"{name}.npy"), "--output",
                    str(tmp_path / f"p_{name}.npy"), "--no-progress"], capsys)[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "p_u8.npy"), np.load(tmp_path / "p_f32.npy"))


def test_progress_bar_goes_to_stderr(run_dir, raw_test, tmp_path, capsys):
    status, captured = run(["predict", str(run_dir), "--input", str(raw_test), "--output",
                            str(tmp_path / "p.npy"), "--batch-size", "128"], capsys)
    assert status == 0 and "359/359" in captured.err


def bad(tmp_path, name, array):
    np.save(tmp_path / name, array)
    return str(tmp_path / name)


@pytest.mark.parametrize("make_input, extra, message", [
    (lambda t: bad(t, "x.npy", np.zeros((5, 9, 9), np.float32)), [],
     r"inputs of shape (5, 9, 9) do not fit the run's examples of shape (8, 8, 1); expected "
     r"(n, 8, 8, 1), (n, 8, 8), (n, 64)"),
    (lambda t: bad(t, "x.npy", np.zeros((5, 8, 8, 1), np.complex64)), [],
     "inputs must be numbers (integer or float), got dtype complex64"),
    (lambda t: ((t / "x.npy").write_bytes(b"garbage"), str(t / "x.npy"))[1], [],
     "x.npy: cannot read as a .npy array: it starts with b'garbag', not the .npy magic"),
    (lambda t: bad(t, "x.npy", np.array([1, None], object)), [], "Python objects in dtype"),
    (lambda t: str(t / "missing.npy"), [], "missing.npy: cannot read as a .npy array: No such file"),
    (lambda t: (np.savez(t / "x.npz", x=np.zeros(3)), str(t / "x.npz"))[1], [],
     "an .npz archive, expected a single .npy array"),
    (lambda t: bad(t, "x.npy", np.zeros((5, 8, 8, 1), np.float32)), ["--batch-size", "0"],
     "--batch-size must be a positive integer, got 0"),
])
def test_bad_inputs_give_one_line_and_no_output(run_dir, tmp_path, capsys, make_input, extra,
                                                message):
    output = tmp_path / "p.npy"
    status, captured = run(["predict", str(run_dir), "--input", make_input(tmp_path), "--output",
                            str(output), "--no-progress", *extra], capsys)
    assert status == 2
    assert message in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("jaxnet: error:")
    assert not output.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_missing_output_directory_and_run(run_dir, raw_test, tmp_path, capsys):
    status, captured = run(["predict", str(run_dir), "--input", str(raw_test), "--output",
                            str(tmp_path / "nowhere" / "p.npy")], capsys)
    assert status == 2 and "directory" in captured.err and "does not exist" in captured.err
    status, captured = run(["predict", str(tmp_path), "--input", str(raw_test), "--output",
                            str(tmp_path / "p.npy")], capsys)
    assert status == 2 and "config.json: missing" in captured.err


def test_an_existing_output_survives_a_failure(run_dir, tmp_path, capsys):
    output = tmp_path / "p.npy"
    output.write_bytes(b"earlier results")
    status, _ = run(["predict", str(run_dir), "--input",
                     bad(tmp_path, "x.npy", np.zeros((5, 7), np.float32)), "--output",
                     str(output)], capsys)
    assert status == 2 and output.read_bytes() == b"earlier results"
