import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jaxnet.app.cli import main

FAST = ["--epochs", "2", "--hidden", "32", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    return out


def test_train_writes_a_complete_run_directory(run_dir):
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["hidden"] == [32] and record["config"]["epochs"] == 2
    assert record["data"]["num_classes"] == 10 and record["data"]["example_shape"] == [8, 8, 1]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds",
                "examples_per_second"} <= set(r)
    tensors = safetensors.numpy.load_file(str(run_dir / "params.safetensors"))
    assert tensors["dense_1.w"].shape == (64, 32) and tensors["dense_2.w"].shape == (32, 10)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_config_same_metrics(run_dir, tmp_path):
    assert main(["train", *FAST, "--out", str(tmp_path / "again")]) == 0
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if "second" not in k}
                          for line in path.read_text().splitlines()]
    assert strip(run_dir / "metrics.jsonl") == strip(tmp_path / "again" / "metrics.jsonl")


def test_eval_prints_metrics_and_confusion_matrix(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"accuracy {last['test_accuracy']:.2%}" in out
    assert "confusion matrix" in out


def test_summary_of_a_run_and_from_options(run_dir, capsys):
    assert main(["summary", str(run_dir)]) == 0
    assert "dense_1" in capsys.readouterr().out
    assert main(["summary", "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "conv_2" in out and "total" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["train", "--hidden", "5,x"], "expected comma-separated integers"),
    (["train", "--activation", "swish"], "invalid choice: 'swish'"),
    (["train", "--dataset", "mnist"], "mnist"),
    (["train", "--dataset", "npz"], "npz"),
    (["eval", "/nonexistent/run"], "/nonexistent/run/config.json: missing"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("jaxnet: error:")


def test_existing_run_directory_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "config.json").read_bytes()
    assert main(["train", *FAST, "--out", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "config.json").read_bytes() == before


def test_corrupt_params_file_is_a_clean_error(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    (broken / "params.safetensors").write_bytes(b"\x00garbage")
    assert main(["eval", str(broken)]) == 2
    assert "params.safetensors: not a readable safetensors file" in capsys.readouterr().err


def test_the_console_command_never_shows_a_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 3)), y_train=np.zeros(5, np.int64))
    result = subprocess.run([sys.executable, "-m", "jaxnet.app.cli", "train", "--dataset", "npz",
                             "--data", str(bad), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("jaxnet: error:")
    assert str(bad) in result.stderr
