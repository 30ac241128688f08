import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jaxnet.app import cli, run
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
    assert record["config"]["validation_split"] == 0.1 and record["data"]["train_examples"] == 1294
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
                "examples_per_second"} <= set(r)
    # the test set measures the chosen epoch only (chosen on validation data)
    assert [r for r in lines if "test_accuracy" in r] == [r for r in lines if r.get("chosen")] \
        == [run.chosen_record(lines)]
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
    chosen = run.chosen_record([json.loads(line) for line in
                                (run_dir / "metrics.jsonl").read_text().splitlines()])
    assert f"accuracy {chosen['test_accuracy']:.2%}" in out
    assert "confusion matrix" in out


def test_summary_of_a_run_and_from_options(run_dir, capsys):
    assert main(["summary", str(run_dir)]) == 0
    assert "dense_1" in capsys.readouterr().out
    assert main(["summary", "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "conv_2" in out and "total" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "jaxnet: error: --epochs must be a positive integer, got 0"),
    (["train", "--batch-size", "0"], "jaxnet: error: --batch-size must be a positive integer, got 0"),
    (["train", "--hidden", "8,0"], "argument --hidden: sizes must be positive, got '8,0'"),
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


@pytest.mark.parametrize("message, shown", [
    ("fit: batch_size must be a positive integer, got 0",
     "--batch-size must be a positive integer, got 0"),
    ("epochs must be a positive integer, got 0", "--epochs must be a positive integer, got 0"),
    ("hidden sizes must be positive integers, got (0,)",
     "--hidden sizes must be positive integers, got (0,)"),
    ("batch-size 30 does not split evenly over 8 devices",
     "--batch-size 30 does not split evenly over 8 devices"),
    ("devices: asked for 3 devices", "--devices: asked for 3 devices"),
    # not about a flag: as they are
    ("runs/x/config.json: epochs must be a positive integer", None),
    ("mnist: no data directory given", None),
    ("predict: x must be (n, *example) inputs", None),
])
def test_library_argument_names_become_flags(message, shown):
    assert cli._with_flag_names(message) == (shown or message)


def test_the_console_command_never_shows_a_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 3)), y_train=np.zeros(5, np.int64))
    result = subprocess.run([sys.executable, "-m", "jaxnet.app.cli", "train", "--dataset", "npz",
                             "--data", str(bad), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("jaxnet: error:")
    assert str(bad) in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()  # no empty run directory left behind


def _quiet_env():
    """The environment without what makes rich treat a pipe as a terminal."""
    return {k: v for k, v in os.environ.items()
            if k not in ("FORCE_COLOR", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES")}


def test_train_into_a_log_prints_one_whole_line_per_epoch(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxnet.app.cli", "train", "--epochs", "2",
                             "--hidden", "32", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=_quiet_env())
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    number = r"\d+\.\d{4}"
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {epoch}/2  train loss {number}  train acc {number}  "
                            rf"val loss {number}  val acc {number}  \d+\.\d\d s", line), line
    assert len(lines) == 2
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"val acc {records[-1]['val_accuracy']:.4f}" in lines[-1]
    summary = result.stdout.splitlines()  # whole lines, not wrapped at 80 columns
    assert len(summary) == 2 and "after 2 epochs" in summary[0] and summary[1].startswith("results:")
    chosen = run.chosen_record(records)
    assert f"test accuracy {chosen['test_accuracy']:.2%}" in summary[0]
    assert f"kept epoch {chosen['epoch']}, chosen by its validation loss" in summary[0]
    quiet = subprocess.run([sys.executable, "-m", "jaxnet.app.cli", "train", "--epochs", "2",
                            "--hidden", "32", "--no-progress", "--out", str(tmp_path / "quiet")],
                           capture_output=True, text=True, timeout=300, env=_quiet_env())
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("argv, message", [
    (["--devices", "3"], "--devices: asked for 3 devices"),
    (["--dataset", "npz", "--data", "/nonexistent/data.npz"], "/nonexistent/data.npz"),
])
def test_a_run_that_fails_before_training_leaves_no_directory(argv, message, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["train", *FAST, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxnet: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "new").exists()


def test_a_run_directory_made_before_a_failure_is_removed(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("fit: batch_size must be a positive integer, got 0")

    monkeypatch.setattr(run, "fit", fail)  # fails once config.json and metrics.jsonl are written
    out = tmp_path / "new" / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("jaxnet: error: --batch-size must be a positive integer, "
                                       "got 0\n")
    assert not (tmp_path / "new").exists()
    given = tmp_path / "given"  # a directory that was there before is left there
    given.mkdir()
    assert main(["train", *FAST, "--out", str(given)]) == 2
    assert given.is_dir() and not (given / "config.json").exists()
