"""``jaxnet export RUN_DIR --format stablehlo|onnx --output FILE``, end to end, and the run
metadata in ``params.safetensors`` that rebuilds a run from the file alone."""

import hashlib
import json
import os
import shutil
import sys
import textwrap

import jax
import numpy as np
import pytest
import safetensors.numpy

import jaxnet as jn
from jaxnet.app.cli import main
from jaxnet.data import load_digits
from jaxnet.runs import params_metadata, params_record
from jaxnet.tensorfile import load_metadata, save_params
from test_export import WITHOUT_JAXNET, run_without_jaxnet

# Runs each exported file on the inputs sys.argv[2] in a process without jaxnet: .onnx files
# with onnxruntime, the others (StableHLO) with jax.export alone.
SERVE = WITHOUT_JAXNET + textwrap.dedent("""
    import numpy as np
    x = np.load(sys.argv[2])
    for path in sys.argv[3:]:
        if path.endswith(".onnx"):
            import onnxruntime
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            y = session.run(None, {"x": x})[0]
        else:
            import jax
            y = jax.export.deserialize(bytearray(open(path, "rb").read())).call(x)
        np.save(path + ".out.npy", np.asarray(y))
""")

TINY = ["--epochs", "1", "--hidden", "8", "--layers", "1", "--heads", "2", "--no-progress"]


def cli(argv, capsys):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr()


def train(out, model, *extra):
    assert main(["train", "--model", model, *TINY, *map(str, extra), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(model, *options)``: the directory of a tiny run, trained on first use."""
    made = {}

    def get(model, *options):
        if (model, options) not in made:
            made[model, options] = train(tmp_path_factory.mktemp("runs") / model, model, *options)
        return made[model, options]
    return get


@pytest.fixture(scope="module")
def mlp_run(runs):
    return runs("mlp")


@pytest.fixture(scope="module")
def raw_test(tmp_path_factory):
    """The digits test images as the loader reads them (before standardisation), as .npy."""
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, load_digits().x_test)
    return path


def needs(fmt: str) -> None:
    """Skips an ONNX test where the onnx extra is not installed."""
    if fmt == "onnx":
        pytest.importorskip("jax2onnx")
        pytest.importorskip("onnxruntime")


def export(run_dir, fmt, output, capsys, *flags) -> str:
    """``jaxnet export``; returns what it printed."""
    status, captured = cli(["export", run_dir, "--format", fmt, "--output", output, *flags],
                           capsys)
    assert status == 0, captured.err
    sidecar = json.loads(output.with_name(output.name + ".json").read_text())
    assert sidecar["format"] == fmt
    assert sidecar["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    return captured.out


def serve_without_jaxnet(path, inputs) -> np.ndarray:
    """The exported file ``path`` run on the inputs file in a process without jaxnet."""
    run_without_jaxnet(path.parent, SERVE, inputs, path)
    return np.load(f"{path}.out.npy")


def assert_matches(name, got, want):
    """Exported outputs against jaxnet's: the report, then the checks."""
    difference = float(np.abs(got - want).max())
    agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"{name}: max abs difference {difference:.3g}, argmax agreement {agreement:.2%}")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert agreement == 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def export_and_compare(run_dir, fmt, raw_test, tmp_path, capsys, proba=False):
    """Exports ``run_dir``, serves the file in a process without jaxnet on the test images and
    compares with ``jaxnet predict`` on the same file."""
    flags = ["--proba"] if proba else []
    status, captured = cli(["predict", run_dir, "--input", raw_test, "--output",
                            tmp_path / "predict.npy", "--no-progress", *flags], capsys)
    assert status == 0, captured.err
    output = tmp_path / f"model.{fmt}"
    printed = export(run_dir, fmt, output, capsys, *flags)
    what = "probabilities" if proba else "logits"
    assert f"{output}: {fmt} program from raw inputs (batch, 8, 8, 1) float32 to {what}" in printed
    assert_matches(f"{run_dir.name} {fmt} {what}", serve_without_jaxnet(output, raw_test),
                   np.load(tmp_path / "predict.npy"))


@pytest.mark.parametrize("fmt, proba", [("stablehlo", False), ("onnx", False),
                                        ("stablehlo", True)])
def test_an_exported_mlp_run_serves_without_jaxnet_as_jaxnet_predict_does(
        mlp_run, raw_test, tmp_path, capsys, fmt, proba):
    needs(fmt)
    export_and_compare(mlp_run, fmt, raw_test, tmp_path, capsys, proba)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
@pytest.mark.parametrize("model", ["cnn", "lstm", "gru", "transformer"])
def test_every_model_kind_exports_and_matches_jaxnet_predict(runs, raw_test, tmp_path, capsys,
                                                             model, fmt):
    needs(fmt)
    export_and_compare(runs(model), fmt, raw_test, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_a_text_run_exports_token_ids_to_next_token_logits(runs, corpus, tmp_path, capsys,
                                                           model, fmt):
    needs(fmt)
    run_dir = runs(model, "--dataset", "text", "--data-dir", corpus, "--seq-len", 8,
                   "--max-chars", 1000)
    run = jn.load_run(run_dir)
    vocab = run.config["data"]["vocab"]
    ids = np.random.default_rng(0).integers(0, len(vocab), size=(9, 8)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    output = tmp_path / f"lm.{fmt}"
    assert "from token ids (batch, 8) int32 to logits" in export(run_dir, fmt, output, capsys)
    assert json.loads((tmp_path / f"lm.{fmt}.json").read_text())["vocab"] == vocab
    got = serve_without_jaxnet(output, tmp_path / "ids.npy")
    assert got.shape == (9, 8, len(vocab))
    assert_matches(f"text {model} {fmt}", got, np.asarray(jn.predict(run.net, run.params, ids)))


def test_a_regression_run_exports_its_predictions_and_refuses_proba(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 5)) * 30 + 100).astype(np.float32)  # far from standardised
    y = ((x - 100) / 30) @ rng.normal(size=(5, 2))
    np.savez(tmp_path / "data.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    np.save(tmp_path / "x.npy", x[40:])
    run_dir = train(tmp_path / "run", "mlp", "--task", "regression", "--data",
                    tmp_path / "data.npz")
    status, captured = cli(["predict", run_dir, "--input", tmp_path / "x.npy", "--output",
                            tmp_path / "predict.npy", "--no-progress"], capsys)
    assert status == 0, captured.err
    output = tmp_path / "model.stablehlo"
    assert "from raw inputs (batch, 5) float32 to predictions" in export(
        run_dir, "stablehlo", output, capsys)
    sidecar = json.loads((tmp_path / "model.stablehlo.json").read_text())
    assert sidecar["task"] == "regression" and sidecar["outputs"][0]["name"] == "predictions"
    got = jax.export.deserialize(bytearray(output.read_bytes())).call(x[40:])
    np.testing.assert_allclose(got, np.load(tmp_path / "predict.npy"), rtol=1e-5, atol=1e-5)
    out = tmp_path / "out"
    out.mkdir()
    err = refused(["export", run_dir, "--output", out / "m", "--proba"], capsys, run_dir, out)
    assert f"--proba: {run_dir} is a regression run" in err


# ---- refusals: one line, exit 2, nothing changed -------------------------------------------

def digests(*directories) -> dict:
    """sha256 of every file under the directories, by path."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in directories for p in sorted(d.rglob("*")) if p.is_file()}


def refused(argv, capsys, *directories):
    """Runs the command, expecting a one-line refusal that leaves the directories as they were;
    returns the line."""
    before = digests(*directories)
    status, captured = cli(argv, capsys)
    assert status == 2, captured
    assert captured.err.startswith("jaxnet: error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    assert digests(*directories) == before
    return captured.err


@pytest.fixture
def out(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def test_an_unknown_format_is_refused_naming_the_flag(mlp_run, out, capsys):
    err = refused(["export", mlp_run, "--format", "tflite", "--output", out / "m"], capsys,
                  mlp_run, out)
    assert "--format: invalid choice: 'tflite' (choose from 'stablehlo', 'onnx')" in err
    assert list(out.iterdir()) == []


def test_an_incomplete_run_directory_is_refused_naming_the_missing_file(mlp_run, tmp_path, out,
                                                                         capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(mlp_run / "config.json", unfinished)
    err = refused(["export", unfinished, "--output", out / "m"], capsys, unfinished, out)
    assert f"{unfinished}/params.safetensors: missing" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = refused(["export", empty, "--output", out / "m"], capsys, empty, out)
    assert f"{empty}/config.json: missing" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("existing", ["m.stablehlo", "m.stablehlo.json"])
def test_an_existing_output_is_kept_unless_forced(mlp_run, out, capsys, existing):
    (out / existing).write_bytes(b"old")
    err = refused(["export", mlp_run, "--output", out / "m.stablehlo"], capsys, mlp_run, out)
    assert f"{out / existing} exists; pass --force to overwrite it" in err
    assert sorted(p.name for p in out.iterdir()) == [existing]
    status, captured = cli(["export", mlp_run, "--output", out / "m.stablehlo", "--force"], capsys)
    assert status == 0, captured.err
    assert (out / existing).read_bytes() != b"old"
    assert sorted(p.name for p in out.iterdir()) == ["m.stablehlo", "m.stablehlo.json"]


def test_an_output_inside_the_run_directory_is_refused(mlp_run, tmp_path, capsys):
    err = refused(["export", mlp_run, "--output", mlp_run / "model.stablehlo"], capsys, mlp_run)
    assert f"--output {mlp_run / 'model.stablehlo'} lies inside the run directory {mlp_run}" in err
    # a run directory read from its params file's metadata, without config.json, too
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(mlp_run / "params.safetensors", bare)
    err = refused(["export", bare, "--output", bare / "sub.stablehlo"], capsys, bare)
    assert f"lies inside the run directory {bare}" in err


def test_a_missing_output_directory_is_refused(mlp_run, tmp_path, capsys):
    err = refused(["export", mlp_run, "--output", tmp_path / "nowhere" / "m"], capsys, mlp_run)
    assert f"directory {tmp_path / 'nowhere'} does not exist" in err
    assert not (tmp_path / "nowhere").exists()


def test_onnx_without_its_extra_is_refused_naming_the_install(mlp_run, out, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` raises ImportError
    err = refused(["export", mlp_run, "--format", "onnx", "--output", out / "m.onnx"], capsys,
                  mlp_run, out)
    assert "--format onnx: export(format='onnx') needs jax2onnx" in err
    assert "pip install 'jaxnet[onnx]'" in err
    assert list(out.iterdir()) == []


def test_a_layer_onnx_cannot_express_is_refused_naming_it(mlp_run, out, capsys, monkeypatch):
    pytest.importorskip("jax2onnx")

    def inexpressible(*args):  # what jax2onnx's missing conversions raise, for a built-in model
        raise NotImplementedError("export: ONNX cannot express these operations (...); the "
                                  "layers using them: dense (dense_1: dot_general)")
    monkeypatch.setattr("jaxnet._onnx_export.check_convertible", inexpressible)
    err = refused(["export", mlp_run, "--format", "onnx", "--output", out / "m.onnx"], capsys,
                  mlp_run, out)
    assert f"{mlp_run}: export: ONNX cannot express" in err and "dense (dense_1" in err
    assert list(out.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(mlp_run, out, capsys, monkeypatch):
    (out / "m.stablehlo").write_bytes(b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    err = refused(["export", mlp_run, "--output", out / "m.stablehlo", "--force"], capsys,
                  mlp_run, out)
    assert "No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == ["m.stablehlo"]  # no temporary file either


# ---- the run record in params.safetensors ---------------------------------------------------

def test_a_runs_params_file_carries_its_config_and_data(mlp_run):
    record = json.loads((mlp_run / "config.json").read_text())
    metadata = load_metadata(mlp_run / "params.safetensors")
    assert metadata["format"] == "jaxnet-run"
    assert {key: json.loads(metadata[key]) for key in ("config", "data", "versions")} == {
        key: record[key] for key in ("config", "data", "versions")}
    assert params_metadata(record) == metadata


def test_the_params_file_alone_rebuilds_the_run(mlp_run, raw_test, tmp_path):
    x = np.load(raw_test)
    run = jn.load_run(mlp_run)
    want = jn.predict(run.net, run.params, run.preprocess(x))
    alone = tmp_path / "model.safetensors"
    shutil.copy(mlp_run / "params.safetensors", alone)
    without_config = tmp_path / "run"
    without_config.mkdir()
    shutil.copy(mlp_run / "params.safetensors", without_config)
    for source in (alone, without_config):
        again = jn.load_run(source)
        assert again.net == run.net
        assert {k: again.config[k] for k in ("config", "data")} == {
            k: run.config[k] for k in ("config", "data")}
        np.testing.assert_array_equal(jn.predict(again.net, again.params, again.preprocess(x)),
                                      want)


def test_a_params_file_without_run_metadata_is_refused_naming_it(mlp_run, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_params(bare, jn.load_run(mlp_run).params)
    assert params_record(bare) is None
    with pytest.raises(ValueError, match=rf"{bare}: its safetensors header carries no jaxnet run "
                                         "metadata"):
        jn.load_run(bare)


def test_damaged_run_metadata_is_refused_naming_the_file(mlp_run, tmp_path):
    tensors = safetensors.numpy.load_file(str(mlp_run / "params.safetensors"))
    metadata = load_metadata(mlp_run / "params.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(safetensors.numpy.save(tensors, metadata={**metadata, "config": "{"}))
    with pytest.raises(ValueError, match=rf"{damaged} \(metadata\): not a valid jaxnet run config"):
        jn.load_run(damaged)
    data = json.loads(metadata["data"]) | {"std": -1}
    damaged.write_bytes(safetensors.numpy.save(tensors, metadata={**metadata,
                                                                  "data": json.dumps(data)}))
    with pytest.raises(ValueError, match=r"\(metadata\): data.std must be positive, got -1"):
        jn.load_run(damaged)
