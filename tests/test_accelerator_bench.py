"""benchmarks/accelerator.py runs end to end at tiny sizes (structure only; no timings judged)."""

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "accelerator.py"


@pytest.fixture(scope="module")
def accelerator():
    spec = importlib.util.spec_from_file_location("accelerator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_flop_count_is_six_times_batch_times_weights(accelerator):
    weights = accelerator.weight_count(8, 3, 10)
    assert weights == 3 * 8 * 8 + 8 * 10
    assert accelerator.train_step_flops(4, weights) == 6 * 4 * weights


def test_a_tiny_run_reports_every_entry_against_the_matmul_rate(accelerator):
    settings = accelerator.Settings(widths=(16,), batches=(8,), steps_per_call=2, rounds=1,
                                    matmul_size=64, matmul_repeats=1)
    results = accelerator.run(settings, log=lambda line: None)
    assert set(results["matmul"]) == {"f32", "bf16"}
    entries = results["entries"]
    assert [(e["width"], e["batch"], e["precision"]) for e in entries] == [
        (16, 8, "f32"), (16, 8, "bf16")]
    for e in entries:
        assert e["steps_per_second"]["min"] <= e["steps_per_second"]["median"] <= e["steps_per_second"]["max"]
        assert e["fraction_of_matmul"] > 0 and e["compile_seconds"] > 0
    text = accelerator.markdown(results, "python benchmarks/accelerator.py --test")
    assert "| 16 | 8 |" in text and "no GPU was available" in text


def test_main_opts_in_to_the_host_allocator_setting_and_writes_results(accelerator, monkeypatch,
                                                                         tmp_path):
    calls = []
    monkeypatch.setattr(accelerator, "keep_freed_host_memory", lambda: calls.append("allocator"))
    monkeypatch.setattr(accelerator, "parse_settings", lambda: calls.append("settings"))
    monkeypatch.setattr(accelerator, "run", lambda settings: {"device": {"platform": "cpu"}})
    monkeypatch.setattr(accelerator, "markdown", lambda results, command: "table\n")
    monkeypatch.setattr(accelerator, "RESULTS", tmp_path / "results")
    accelerator.main()
    assert calls == ["allocator", "settings"]  # before anything touches the device
    assert (tmp_path / "results" / "accelerator-cpu.md").read_text() == "table\n"
    assert "command" in json.loads((tmp_path / "results" / "accelerator-cpu.json").read_text())
