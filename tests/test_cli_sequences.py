"""``jaxnet train --model lstm|gru|transformer`` on images and text, and ``jaxnet generate``."""

import json
import math

import pytest


from jaxnet.app.cli import main
from jaxnet.app.run import chosen_record



def run(argv, capsys):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr()


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_lstm_learns_digits_from_their_rows(tmp_path, capsys):
    status, captured = run(["train", "--model", "lstm", "--dataset", "digits", "--epochs", 2,
                            "--hidden", 64, "--lr", 0.01, "--no-progress", "--out",
                            tmp_path / "lstm"], capsys)
    assert status == 0, captured.err
    assert chosen_record(metrics(tmp_path / "lstm"))["test_accuracy"] > 0.5
    assert "lstm on digits: test accuracy" in captured.out


@pytest.mark.parametrize("model", ["gru", "transformer"])
def test_gru_and_transformer_train_on_digits(model, tmp_path, capsys):
    status, captured = run(["train", "--model", model, "--epochs", 1, "--hidden", 16,
                            "--layers", 1, "--heads", 2, "--no-progress", "--out",
                            tmp_path / model], capsys)
    assert status == 0, captured.err
    record = json.loads((tmp_path / model / "config.json").read_text())
    assert record["config"]["model"] == model and record["config"]["layers"] == 1
    assert 0 <= chosen_record(metrics(tmp_path / model))["test_accuracy"] <= 1


@pytest.fixture(scope="module")
def text_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "text"
    status = main(["train", "--dataset", "text", "--data-dir", str(corpus), "--model",
                   "transformer", "--hidden", "32", "--layers", "1", "--heads", "2",
                   "--seq-len", "16", "--max-chars", "3000", "--epochs", "2", "--lr", "0.01",
                   "--batch-size", "16", "--no-progress", "--out", str(out)])
    assert status == 0
    return out


def test_a_text_language_model_reports_falling_bits_per_character(text_run, corpus):
    first, second = metrics(text_run)
    for record in (first, second):
        assert record["val_bits_per_char"] == pytest.approx(record["val_loss"] / math.log(2))
    assert second["train_bits_per_char"] < first["train_bits_per_char"]
    assert second["val_bits_per_char"] < first["val_bits_per_char"]
    chosen = chosen_record([first, second])  # the test set measures the kept epoch only
    assert chosen["test_bits_per_char"] == pytest.approx(chosen["test_loss"] / math.log(2))
    data = json.loads((text_run / "config.json").read_text())["data"]
    assert data["task"] == "language_model" and set((corpus / "module_0.py").read_text()) == set(data["vocab"])
    assert data["example_shape"] == [16] and data["num_classes"] == len(data["vocab"])


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_recurrent_language_models_train_on_text(model, corpus, tmp_path, capsys):
    status, captured = run(["train", "--dataset", "text", "--data-dir", corpus, "--model", model,
                            "--hidden", 16, "--seq-len", 8, "--max-chars", 1000, "--epochs", 1,
                            "--no-progress", "--out", tmp_path / model], capsys)
    assert status == 0, captured.err
    assert f"{model} on text: test bits per character" in captured.out
    status, captured = run(["generate", tmp_path / model, "--prompt", "def", "--length", 5],
                           capsys)
    assert status == 0 and len(captured.out) == len("def") + 5 + 1


def test_generate_prints_the_prompt_and_the_requested_length(text_run, capsys):
    outputs = []
    for seed in (0, 0, 1):
        status, captured = run(["generate", text_run, "--prompt", "class ", "--length", 40,
                                "--seed", seed, "--temperature", 1.0], capsys)
        assert status == 0, captured.err
        assert captured.out.startswith("class ") and len(captured.out) == len("class ") + 40 + 1
        outputs.append(captured.out)
    assert outputs[0] == outputs[1]  # same seed, same text
    assert outputs[0] != outputs[2]


def test_generate_at_temperature_zero_is_greedy(text_run, capsys):
    import jax
    import numpy as np

    import jaxnet as jn
    from jaxnet.text import Vocabulary

    outputs = {run(["generate", text_run, "--prompt", "def a", "--length", 20, "--seed", seed,
                    "--temperature", 0], capsys)[1].out for seed in (0, 1)}
    assert len(outputs) == 1  # no randomness
    loaded = jn.load_run(text_run)
    vocab = Vocabulary(loaded.config["data"]["vocab"])
    ids = list(vocab.encode("def a"))
    for _ in range(20):  # the most likely next character, from the last 16 (the window)
        logits = loaded.net.apply(loaded.params, np.asarray(ids[-16:], np.int32)[None])
        ids.append(int(jax.numpy.argmax(logits[0, -1])))
    assert outputs.pop() == vocab.decode(ids) + "\n"


def test_eval_of_a_text_run_reports_bits_per_character(text_run, capsys):
    status, captured = run(["eval", text_run], capsys)
    assert status == 0 and "bits per character" in captured.out


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "dé☃"], "--prompt has characters that are not in the run's vocabulary: 'é', '☃'"),
    (["--prompt", ""], "--prompt must hold at least one character"),
    (["--prompt", "a", "--length", "-1"], "--length must be an integer >= 0"),
    (["--prompt", "a", "--temperature", "-0.5"], "--temperature must be >= 0"),
])
def test_generate_errors_are_one_line(text_run, argv, message, capsys):
    status, captured = run(["generate", text_run, *argv], capsys)
    assert status == 2 and captured.out == ""
    assert captured.err.startswith(f"jaxnet: error: {message}") and captured.err.count("\n") == 1


def test_generate_refuses_a_classifier_run_and_a_missing_one(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert main(["train", "--epochs", "1", "--hidden", "8", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    status, captured = run(["generate", out, "--prompt", "a"], capsys)
    assert status == 2 and "is not a language model run (it was trained on digits)" in captured.err
    status, captured = run(["generate", tmp_path / "none", "--prompt", "a"], capsys)
    assert status == 2 and f"{tmp_path / 'none' / 'config.json'}: missing" in captured.err


def test_text_needs_a_sequence_model_and_enough_files(corpus, tmp_path, capsys):
    status, captured = run(["train", "--dataset", "text", "--data-dir", corpus, "--out",
                            tmp_path / "a"], capsys)
    assert status == 2 and "--model mlp does not fit --dataset text" in captured.err
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "a.txt").write_text("abc")
    status, captured = run(["train", "--dataset", "text", "--model", "gru", "--data-dir",
                            tmp_path / "lone", "--out", tmp_path / "b"], capsys)
    assert status == 2 and "needs at least two text files" in captured.err
    assert not (tmp_path / "b").exists()


def test_predict_refuses_a_text_run(text_run, tmp_path, capsys):
    status, captured = run(["predict", text_run, "--input", tmp_path / "x.npy", "--output",
                            tmp_path / "p.npy"], capsys)
    assert status == 2 and "use jaxnet generate" in captured.err


def test_summary_of_a_text_run_shows_the_model(text_run, capsys):
    status, captured = run(["summary", text_run], capsys)
    assert status == 0 and "total" in captured.out
