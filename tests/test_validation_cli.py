"""``jaxnet train`` chooses its epoch on held-out validation rows, stops early with
``--patience``, measures only the chosen epoch on the test set, and resumes the choice exactly."""

import dataclasses
import json

import numpy as np
import pytest

from jaxnet import data as datasets
from jaxnet.app import run
from jaxnet.app.cli import main
from jaxnet.train import evaluate

# On digits this recipe overfits from epoch 6: the validation loss is lowest at epoch 5.
CONFIG = run.RunConfig(hidden=(16,), epochs=8, batch_size=64, lr=0.03, schedule="constant")
FLAGS = ["--hidden", "16", "--epochs", "8", "--batch-size", "64", "--lr", "0.03", "--schedule",
         "constant", "--no-progress"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "second" not in k} for r in history]


def test_the_validation_rows_are_a_fixed_choice_whatever_the_seed():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # row i holds 2i, 2i + 1
    dataset = datasets.Dataset(x, np.arange(20, dtype=np.int32), x[:2], np.arange(2, dtype=np.int32),
                               20, "rows")
    kept, (x_val, y_val) = run.split_validation(dataset, 0.25)
    again, (x_again, _) = run.split_validation(dataset, 0.25)
    assert len(y_val) == 5 and len(kept.y_train) == 15
    np.testing.assert_array_equal(x_val, x_again)
    assert sorted([*kept.y_train.tolist(), *y_val.tolist()]) == list(range(20))  # a partition
    assert kept.y_train.tolist() == sorted(kept.y_train.tolist())  # in their order
    np.testing.assert_array_equal(kept.x_train[:, 0], 2 * kept.y_train)  # x and y stay paired
    assert run.split_validation(dataset, 0.0) == (dataset, None)


def test_a_run_keeps_its_best_validation_epoch_and_tests_only_that_one(tmp_path):
    state, history, net, dataset = run.train(CONFIG, tmp_path, progress=False)
    losses = [r["val_loss"] for r in history]
    chosen = run.chosen_record(history)
    assert chosen["epoch"] == int(np.argmin(losses)) + 1 == 5 < len(history) == 8
    assert [r["epoch"] for r in history if "test_loss" in r] == [5]  # measured once
    assert records(tmp_path) == history  # metrics.jsonl says which epoch was chosen
    _, _, _, params = run.read_run(tmp_path)  # the chosen epoch's params: they give its numbers
    _, (x_val, y_val) = run.split_validation(run.load_data(CONFIG)[0], CONFIG.validation_split)
    assert evaluate(net, params, (x_val, y_val))["loss"] == pytest.approx(chosen["val_loss"],
                                                                         rel=1e-5)
    test = evaluate(net, params, (dataset.x_test, dataset.y_test))
    assert test["accuracy"] == pytest.approx(chosen["test_accuracy"])


def test_patience_stops_early_and_the_command_says_which_epoch_it_kept(tmp_path, capsys):
    assert main(["train", *FLAGS, "--patience", "2", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    history = records(tmp_path / "run")
    chosen = run.chosen_record(history)
    assert [r["epoch"] for r in history] == list(range(1, 8)) and chosen["epoch"] == 5
    assert (f"test accuracy {chosen['test_accuracy']:.2%}, test loss {chosen['test_loss']:.4f} "
            "after 7 epochs") in printed
    assert (f"kept epoch 5, chosen by its validation loss {chosen['val_loss']:.4f}, accuracy "
            f"{chosen['val_accuracy']:.2%}, stopped early (--patience 2)") in printed
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["validation_split"] == 0.1 and config["patience"] == 2


def test_without_a_validation_split_the_last_epoch_is_kept_and_said_so(tmp_path, capsys):
    assert main(["train", *FLAGS, "--epochs", "2", "--validation-split", "0", "--out",
                 str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    history = records(tmp_path / "run")
    assert all("test_accuracy" in r and "val_loss" not in r for r in history)  # every epoch's
    assert run.chosen_record(history) is history[-1] and history[-1]["chosen"]
    assert ("kept the last epoch (--validation-split 0: no validation, the test metrics chose "
            "nothing)") in printed
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert data["train_examples"] == 1438  # all of the training set


def test_a_run_resumed_after_its_best_epoch_ends_with_the_same_bits(tmp_path, monkeypatch):
    """The best epoch's state is in the checkpoints: the resumed run ends with it."""
    config = dataclasses.replace(CONFIG, patience=2, checkpoint_every=1, keep_checkpoints=1)
    run.train(config, tmp_path / "whole", progress=False)
    real_save = run.save_checkpoint

    def dies_at_epoch_7(directory, state, **kwargs):  # after epoch 7's record, before its save
        if kwargs["metadata"]["epoch"] == 7:
            raise KeyboardInterrupt
        return real_save(directory, state, **kwargs)

    monkeypatch.setattr(run, "save_checkpoint", dies_at_epoch_7)
    with pytest.raises(KeyboardInterrupt):
        run.train(config, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    kept = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()]
    assert kept == ["ckpt-000126"]  # epoch 6 of 21 steps each, past the best (5) it holds
    _, history, _, _ = run.train(config, tmp_path / "killed", progress=False, resume=True)
    assert [r["epoch"] for r in history] == list(range(1, 8))
    assert run.chosen_record(history)["epoch"] == 5
    for name in ("params.safetensors", "metrics.jsonl"):
        whole, resumed = (tmp_path / d / name for d in ("whole", "killed"))
        if name == "metrics.jsonl":
            assert without_times(records(resumed.parent)) == without_times(records(whole.parent))
        else:
            assert resumed.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--validation-split", "1"], "--validation-split must be in [0, 1), got 1.0"),
    (["--validation-split", "0.0001"], "--validation-split must leave examples for validation "
                                       "and for training: 0.0001 of 1438 leaves 0 and 1438"),
    (["--patience", "-1"], "--patience must be an integer >= 0, got -1"),
    (["--patience", "2", "--validation-split", "0"],
     "--patience must be 0 when validation-split is 0 (early stopping needs validation data)"),
])
def test_bad_validation_options_give_one_line(tmp_path, capsys, flags, message):
    assert main(["train", *FLAGS, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()
