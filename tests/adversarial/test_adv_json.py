"""metrics.jsonl and config.json are strict JSON (no NaN or Infinity), and config.json's values
are checked when read back."""

import json
import math
import shutil

import numpy as np
import pytest

from adv_helpers import digests, refused
from jaxnet.app import run
from jaxnet.app.rundir import strict_dumps
from jaxnet.run_manifest import MANIFEST_FILE, seal_run


def _strict_loads(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_strict_dumps_writes_non_finite_numbers_as_null():
    record = {"loss": math.nan, "top": [1.0, math.inf, -math.inf], "nested": {"x": np.float32("nan")},
              "ok": np.float64(0.5), "n": 3}
    assert _strict_loads(strict_dumps(record)) == {"loss": None, "top": [1.0, None, None],
                                                   "nested": {"x": None}, "ok": 0.5, "n": 3}


def test_a_diverged_epoch_is_written_as_strict_json(tmp_path):
    config = run.RunConfig(epochs=1)
    on_epoch = run._run_writer(tmp_path, config, [])
    on_epoch({"epoch": 1, "train_loss": math.nan, "test_loss": math.inf, "test_accuracy": 0.1},
             None)
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _strict_loads(line) == {"epoch": 1, "train_loss": None, "test_loss": None,
                                   "test_accuracy": 0.1}


def test_a_finished_runs_files_are_strict_json(finished_run, finished_sweep):
    for path in (finished_run / "config.json", finished_sweep / "sweep.json",
                 finished_sweep / "results.json"):
        _strict_loads(path.read_text())
    for path in (finished_run / "metrics.jsonl", finished_sweep / "metrics.jsonl"):
        for line in path.read_text().splitlines():
            _strict_loads(line)


@pytest.mark.parametrize("key, value, shown", [
    (("data", "std"), 0.0, "data.std"),
    (("data", "std"), -1.0, "data.std"),
    (("data", "std"), None, "data.std"),
    (("data", "mean"), "NaN", "data.mean"),
    (("data", "num_classes"), 0, "data.num_classes"),
    (("data", "example_shape"), [8, -8, 1], "data.example_shape"),
    (("config", "lr"), "NaN", "lr"),
    (("config", "drop_rate"), "Infinity", "drop_rate"),
    (("config", "seed"), 10 ** 30, "seed"),
])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_bad_config_values_are_refused_naming_the_file_and_key(finished_run, tmp_path, capsys,
                                                                key, value, shown, command):
    damaged = tmp_path / "run"
    shutil.copytree(finished_run, damaged, ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((damaged / "config.json").read_text())
    section, name = key
    record[section][name] = value
    text = json.dumps(record)
    if value in ("NaN", "Infinity"):  # what a non-strict writer would have put there
        text = text.replace(f'"{value}"', value)
    (damaged / "config.json").write_text(text)
    (damaged / MANIFEST_FILE).unlink()  # recorded as they are: the values alone are wrong
    seal_run(damaged)
    before = digests(damaged)
    argv = ["eval", damaged] if command == "eval" else [
        "predict", damaged, "--input", tmp_path / "x.npy", "--output", tmp_path / "p.npy"]
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    refused(argv, capsys, damaged / "config.json", shown)
    assert digests(damaged) == before and not (tmp_path / "p.npy").exists()
