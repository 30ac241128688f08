import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxnet.app import cli
from jaxnet.app.run import RunConfig, chosen_record, load_data, read_run, train
from jaxnet.app.sweep import sweep, sweep_configs
from jaxnet.tensorfile import load_params
from jaxnet.train import evaluate

BASE = RunConfig(hidden=(16,), epochs=2, batch_size=64, lr=1e-2)


def test_the_grid_is_every_setting_times_every_seed():
    configs = sweep_configs(dataclasses.replace(BASE, seed=5), 2,
                            {"lr": (1e-3, 1e-2), "drop_rate": (0.0, 0.5)})
    assert [(c.lr, c.drop_rate, c.seed) for c in configs] == [
        (1e-3, 0.0, 5), (1e-3, 0.0, 6), (1e-3, 0.5, 5), (1e-3, 0.5, 6),
        (1e-2, 0.0, 5), (1e-2, 0.0, 6), (1e-2, 0.5, 5), (1e-2, 0.5, 6)]
    assert all(c.hidden == (16,) and c.weight_decay == 0 and c.init_scale == 1 for c in configs)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="seeds must be a positive integer, got 0"):
        sweep_configs(BASE, 0, {})
    with pytest.raises(ValueError, match=r"a sweep varies only lr, weight_decay, drop_rate, init_scale; got \['hidden'\]"):
        sweep_configs(BASE, 1, {"hidden": (8,)})
    with pytest.raises(ValueError, match=r"drop-rate must be in \[0, 1\), got 1.5"):
        sweep_configs(BASE, 1, {"drop_rate": (0.1, 1.5)})
    with pytest.raises(ValueError, match="validation-split must be > 0 for a sweep: it chooses"):
        sweep_configs(dataclasses.replace(BASE, validation_split=0.0), 1, {})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    grid = {"lr": (1e-3, 1e-2), "drop_rate": (0.0, 0.2), "init_scale": (1.0, 0.5)}
    return out, sweep(BASE, 2, grid, out, progress=False)


def member_curve(out, index, key):
    return [json.loads(line)[key][index]
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_member_is_the_run_jaxnet_train_makes_from_its_config(swept, tmp_path):
    out, results = swept
    configs = json.loads((out / "sweep.json").read_text())["members"]
    # member 13: lr 1e-2, drop_rate 0.2, init_scale 1.0, seed 1; member 9 has no dropout, so
    # jaxnet train builds its network without Dropout layers (which shift the initial keys)
    for index, drop_rate in ((13, 0.2), (9, 0.0)):
        member = results["members"][index]
        assert (member["lr"], member["drop_rate"], member["seed"]) == (1e-2, drop_rate, 1)
        config = RunConfig.from_dict(configs[index])
        assert config == dataclasses.replace(BASE, lr=1e-2, drop_rate=drop_rate, seed=1)
        _, history, _, _ = train(config, tmp_path / f"alone-{index}", progress=False)
        for key, tolerance in (("val_loss", 1e-4), ("val_accuracy", 1e-6)):  # same held-out rows
            np.testing.assert_allclose(member_curve(out, index, key), [r[key] for r in history],
                                       rtol=tolerance)
        assert member["chosen_epoch"] == chosen_record(history)["epoch"]
    best = results["best"]  # measured on the test set as jaxnet train measures its chosen epoch
    config = RunConfig.from_dict(configs[best["member"]])
    _, history, _, _ = train(config, None, progress=False)
    alone = chosen_record(history)
    assert alone["epoch"] == best["chosen_epoch"]
    np.testing.assert_allclose(best["test_accuracy"], alone["test_accuracy"], atol=1e-6)
    np.testing.assert_allclose(best["test_loss"], alone["test_loss"], rtol=1e-4)


def test_members_are_chosen_on_validation_data_and_only_the_best_is_tested(swept):
    out, results = swept
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and len(lines[0]["val_accuracy"]) == 16
    assert not any(key.startswith("test_") for r in lines for key in r)  # never measured per epoch
    members = results["members"]
    for m in members:
        curve = member_curve(out, m["member"], "val_loss")
        assert m["chosen_epoch"] == int(np.argmin(curve)) + 1
        assert m["val_loss"] == min(curve) and not any(k.startswith("test_") for k in m)
    best = results["best"]
    assert best["val_loss"] == min(m["val_loss"] for m in members)
    assert {"test_loss", "test_accuracy"} <= set(best)


def test_the_sweep_directory_holds_results_plots_and_the_best_run(swept):
    out, results = swept
    assert {p.name for p in out.iterdir()} == {"sweep.json", "metrics.jsonl", "results.json",
                                               "results.md", "curves.png", "best"}
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["settings"]) == 8 and all(s["seeds"] == 2 for s in saved["settings"])
    accuracies = [m["val_accuracy"] for m in saved["members"][:2]]
    assert saved["settings"][0]["val_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    best = saved["best"]
    assert 0.5 < saved["ensemble"]["test_accuracy"] <= 1 and saved["ensemble"]["members"] == 16
    markdown = (out / "results.md").read_text()
    assert "| lr | weight_decay | drop_rate | init_scale | seeds | val accuracy (mean ± std) |" in markdown
    assert f"Best member {best['member']} (seed {best['seed']}" in markdown
    assert "chosen by its validation loss" in markdown and "Ensemble of the 16 members" not in markdown
    assert "ensemble of the 16 members with a finite validation loss" in markdown
    config, _, net, params = read_run(out / "best")
    assert config.seed == best["seed"] and config.lr == best["lr"]
    x = np.zeros((1, 8, 8), np.float32)
    assert net.apply(params, x).shape == (1, 10)
    assert jax.tree.structure(load_params(out / "best" / "params.safetensors")) == jax.tree.structure(params)
    from jaxnet.runs import params_record  # the params file alone rebuilds the best member
    assert params_record(out / "best" / "params.safetensors")["config"]["seed"] == best["seed"]
    records = [json.loads(line) for line in (out / "best" / "metrics.jsonl").read_text().splitlines()]
    kept = chosen_record(records)
    assert kept["epoch"] == best["chosen_epoch"] and kept["test_accuracy"] == best["test_accuracy"]
    test = load_data(config)[0]  # the kept params are the chosen epoch's: they give its numbers
    assert evaluate(net, params, (test.x_test, test.y_test))["accuracy"] == pytest.approx(
        best["test_accuracy"])


def test_jaxnet_sweep_prints_a_table_and_writes_its_directory(tmp_path, capsys):
    out = tmp_path / "sweep"
    status = cli.main(["sweep", "--hidden", "8", "--epochs", "1", "--seeds", "2", "--lr",
                       "1e-3,3e-3", "--shared-order", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "4 members, 1 epochs" in printed and "val accuracy" in printed
    assert "Best member" in printed and "chosen by its validation loss" in printed
    assert (out / "results.md").is_file() and (out / "best" / "params.safetensors").is_file()
    assert cli.main(["sweep", "--out", str(out)]) == 2
    assert "already holds a sweep" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["--lr", "1e-3,-1"], "--lr must be a positive number, got -1.0"),
    (["--weight-decay", "x"], "argument --weight-decay: expected comma-separated numbers, got 'x'"),
    (["--init-scale", "0"], "--init-scale must be a positive number, got 0.0"),
    (["--validation-split", "0"], "--validation-split must be > 0 for a sweep"),
    (["--dataset", "npz", "--data", "/nonexistent/data.npz"], "/nonexistent/data.npz"),
])
def test_jaxnet_sweep_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()  # nothing written
