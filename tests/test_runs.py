"""jaxnet.load_run and restore_params on a run directory: a run read back by the library."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxnet as jn
from jaxnet.app.cli import main
from jaxnet.data import load_digits
from jaxnet.runs import Run, build_model, preprocess_for


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--epochs", "1", "--hidden", "16", "--no-progress", "--out", str(out)]) == 0
    return out


def test_load_run_predicts_what_jaxnet_predict_writes(run_dir, tmp_path, capsys):
    x = load_digits().x_test  # raw, as the loader reads it
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(run_dir), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "p.npy"), "--no-progress"]) == 0
    run = jn.load_run(run_dir)
    assert isinstance(run, Run) and run.model_state == {}
    assert run.config["config"]["hidden"] == [16] and run.config["data"]["num_classes"] == 10
    np.testing.assert_allclose(jn.predict(run.net, run.params, run.preprocess(x)),
                               np.load(tmp_path / "p.npy"), rtol=1e-6, atol=1e-6)


def test_preprocess_takes_flat_pixels_and_standardises(run_dir):
    run = jn.load_run(run_dir)
    x = (load_digits().x_test[:5] * 255).astype(np.uint8)
    data = run.config["data"]
    expected = (x / np.float32(255) - np.float32(data["mean"])) / np.float32(data["std"])
    got = run.preprocess(x.reshape(5, 64))
    assert got.shape == (5, 8, 8, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(n, 8, 8, 1\), \(n, 8, 8\), \(n, 64\)"):
        run.preprocess(np.zeros((2, 7)))


def test_restore_params_reads_a_run_directory(run_dir):
    run = jn.load_run(run_dir)
    template = jax.tree.map(np.zeros_like, run.params)
    params, report = jn.restore_params(run_dir, template)
    assert report.missing == () and report.unexpected == () and report.mismatched == ()
    jax.tree.map(np.testing.assert_array_equal, params, run.params)


def test_restore_params_names_a_directory_that_is_neither(tmp_path):
    with pytest.raises(jn.CheckpointError, match=rf"{tmp_path}: neither a checkpoint \(no "
                                                 r"manifest.json\) nor a finished run directory"):
        jn.restore_params(tmp_path, {"w": np.zeros(2)})


def test_restore_params_still_reports_a_run_that_does_not_fit(run_dir):
    with pytest.raises(jn.CheckpointError, match="params do not fit the model"):
        jn.restore_params(run_dir, {"w": np.zeros(2, np.float32)})


def test_a_missing_or_unfinished_run_directory_is_named(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/config.json: missing"):
        jn.load_run(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.json", unfinished)
    with pytest.raises(FileNotFoundError, match=r"params.safetensors: missing; the run in .* "
                                                r"did not finish"):
        jn.load_run(unfinished)
    (unfinished / "config.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="config.json: not a valid jaxnet run config"):
        jn.load_run(unfinished)


@pytest.mark.parametrize("model, output", [("lstm", (2, 10)), ("gru", (2, 10)),
                                           ("transformer", (2, 10)), ("cnn", (2, 10))])
def test_sequence_models_read_image_rows_as_time_steps(model, output):
    config = {"model": model, "hidden": [8], "activation": "relu", "drop_rate": 0.0,
              "layers": 2, "heads": 2}
    net = build_model(config, {"num_classes": 10, "example_shape": [8, 8, 1]})
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    params = net.init(jax.random.key(0), x)
    assert net.apply(params, x).shape == output


@pytest.mark.parametrize("model", ["lstm", "gru", "transformer"])
def test_text_models_are_causal_language_models(model):
    config = {"model": model, "hidden": [8], "layers": 1, "heads": 2}
    data = {"num_classes": 5, "example_shape": [6], "task": "language_model"}
    net = build_model(config, data)
    tokens = np.asarray([[0, 1, 2, 3, 4, 0]], np.int32)
    params = net.init(jax.random.key(0), tokens)
    logits = net.apply(params, tokens)
    assert logits.shape == (1, 6, 5)
    future = tokens.copy()
    future[:, 4:] = 1  # changing later tokens leaves earlier outputs as they were
    changed = net.apply(params, future)
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], atol=1e-6)


def test_mlp_on_text_and_unknown_models_are_refused():
    text = {"num_classes": 5, "example_shape": [6], "task": "language_model"}
    with pytest.raises(ValueError, match="model 'mlp' does not fit text"):
        build_model({"model": "mlp", "hidden": [8]}, text)
    with pytest.raises(ValueError, match="model must be one of mlp, cnn, lstm, gru, transformer"):
        build_model({"model": "rnn"}, {"num_classes": 2, "example_shape": [3]})


def test_text_runs_take_integer_token_ids():
    data = {"example_shape": [4], "task": "language_model"}
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    got = preprocess_for(data, ids.shape, ids.dtype)(ids)
    assert got.dtype == np.int32 and got.tolist() == ids.tolist()
    with pytest.raises(TypeError, match="integer token ids"):
        preprocess_for(data, (2, 4), np.float32)
