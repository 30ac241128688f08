"""``jaxnet train --task regression --data FILE.npz``, and ``eval``/``predict`` on such runs."""

import json
import re

import numpy as np
import pytest

import jaxnet as jn
from jaxnet.app.cli import main

FAST = ["--epochs", "8", "--hidden", "32", "--lr", "1e-2", "--validation-split", "0",
        "--no-progress"]


def regression_file(path, rng, n_train=160, n_test=40, outputs=(2,)):
    """Two targets from five inputs on a scale far from 1 (so standardising inputs matters)."""
    weights = rng.normal(size=(5, *outputs))
    def split(n):
        x = (rng.normal(size=(n, 5)) * 30 + 100).astype(np.float32)
        return x, np.tensordot((x - 100) / 30, weights, axes=1).astype(np.float64)
    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_test, y_test


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    x_test, y_test = regression_file(tmp / "data.npz", np.random.default_rng(0))
    out = tmp / "run"
    assert main(["train", "--task", "regression", "--data", str(tmp / "data.npz"), *FAST,
                 "--out", str(out)]) == 0
    return out, x_test, y_test


def test_a_regression_run_records_mean_errors_and_no_accuracy(run, capsys):
    out, x_test, y_test = run
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["task"] == "regression" and record["config"]["dataset"] == "npz"
    assert record["data"]["task"] == "regression" and record["data"]["num_classes"] == 2
    assert abs(record["data"]["mean"] - 100) < 5 and abs(record["data"]["std"] - 30) < 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("accuracy" not in key for r in lines for key in r)
    assert {"train_loss", "train_mae", "test_loss", "test_mae"} <= set(lines[-1])
    assert lines[-1]["test_loss"] < 0.5 * lines[0]["test_loss"]

    loaded = jn.load_run(out)
    predicted = jn.predict(loaded.net, loaded.params, loaded.preprocess(x_test))
    assert predicted.shape == (40, 2)
    np.testing.assert_allclose(lines[-1]["test_loss"], np.mean((predicted - y_test) ** 2),
                               rtol=1e-4)
    np.testing.assert_allclose(lines[-1]["test_mae"], np.mean(np.abs(predicted - y_test)),
                               rtol=1e-4)


def test_eval_and_predict_work_on_a_regression_run(run, tmp_path, capsys):
    out, x_test, y_test = run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"mean squared error {last['test_loss']:.4g}" in printed
    assert f"mean absolute error {last['test_mae']:.4g}" in printed
    assert "confusion" not in printed

    np.save(tmp_path / "x.npy", x_test)
    assert main(["predict", str(out), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "p.npy"), "--no-progress"]) == 0
    assert "predictions of shape (40, 2)" in capsys.readouterr().out
    predicted = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(np.mean((predicted - y_test) ** 2), last["test_loss"], rtol=1e-4)
    assert main(["predict", str(out), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "q.npy"), "--proba"]) == 2
    assert "--proba: " in capsys.readouterr().err and not (tmp_path / "q.npy").exists()


def test_one_dimensional_targets_train_one_output(tmp_path, rng, capsys):
    regression_file(tmp_path / "data.npz", rng, n_train=40, n_test=10, outputs=())
    out = tmp_path / "run"
    assert main(["train", "--task", "regression", "--dataset", "npz", "--data",
                 str(tmp_path / "data.npz"), "--epochs", "1", "--hidden", "8",
                 "--no-progress", "--out", str(out)]) == 0
    assert "test MSE" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["data"]["num_classes"] == 1
    assert jn.load_run(out).params["dense_2"]["w"].shape == (8, 1)


def _arrays(rng, **changes):
    arrays = {"x_train": rng.normal(size=(12, 3)), "y_train": rng.normal(size=12),
              "x_test": rng.normal(size=(4, 3)), "y_test": rng.normal(size=4)}
    return {**arrays, **changes}


@pytest.mark.parametrize("task, changes, message", [
    ("classification", {}, r"y_train must be a 1-D integer array of class labels, got shape "
                           r"\(12,\) of float64 \(regression targets need task regression\)"),
    ("regression", {"y_test": np.array([1.0, np.nan, 0.0, 2.0])},
     "y_test has NaN or infinite values"),
    ("regression", {"y_train": np.zeros(11)},
     "x_train has 12 examples but y_train has 11 targets"),
    ("regression", {"y_train": np.zeros((12, 2, 2))},
     r"y_train must hold numeric regression targets of shape \(n,\) or \(n, outputs\), got "
     r"shape \(12, 2, 2\)"),
    ("regression", {"y_test": np.zeros((4, 2))},
     "y_train has 1 targets per example but y_test 2"),
])
def test_bad_data_is_one_line_and_exit_2(tmp_path, rng, capsys, task, changes, message):
    np.savez(tmp_path / "data.npz", **_arrays(rng, **changes))
    out = tmp_path / "run"
    assert main(["train", "--task", task, "--data", str(tmp_path / "data.npz"), *FAST,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxnet: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_regression_needs_an_npz_file(capsys):
    assert main(["train", "--task", "regression", *FAST]) == 2
    assert ("--task regression needs your own data, --dataset npz --data FILE.npz (got "
            "--dataset digits)") in capsys.readouterr().err
    assert main(["train", "--task", "ranking"]) == 2
    assert "--task: invalid choice: 'ranking'" in capsys.readouterr().err
