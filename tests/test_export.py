"""jaxnet.export: StableHLO and ONNX files that serve without jaxnet, and docs/export.md."""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
from typing import ClassVar

import jax
import numpy as np
import pytest
from jax import lax

import jaxnet as jn
from jaxnet.app.cli import main
from jaxnet.export import serving_function
from jaxnet.models import cnn, mlp

DOC = pathlib.Path(__file__).parent.parent / "docs" / "export.md"
REPO = pathlib.Path(__file__).parent.parent.resolve()

# The start of a script that must run without jaxnet: the repository (sys.argv[1]) and
# jaxnet's editable-install finder are removed first, and it checks that jaxnet cannot be
# imported.
WITHOUT_JAXNET = textwrap.dedent("""
    import sys, pathlib
    repo = pathlib.Path(sys.argv[1]).resolve()
    sys.path[:] = [p for p in sys.path if p and pathlib.Path(p).resolve() != repo]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    try:
        import jaxnet
    except ImportError:
        pass
    else:
        raise SystemExit("jaxnet was importable: " + str(jaxnet.__file__))
""")

# Loads an exported file (sys.argv[2]) with JAX alone and runs it on the inputs sys.argv[3:].
RELOAD = WITHOUT_JAXNET + textwrap.dedent("""
    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[2], "rb").read()))
    for name in sys.argv[3:]:
        np.save(name + ".out.npy", np.asarray(exported.call(np.load(name))))
""")


def run_without_jaxnet(cwd, script: str, *args) -> None:
    """Runs ``script`` (starting with ``WITHOUT_JAXNET``) in a fresh Python process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(REPO), *map(str, args)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _reload_without_jaxnet(tmp_path, model, inputs):
    names = []
    for i, x in enumerate(inputs):
        names.append(str(tmp_path / f"x{i}.npy"))
        np.save(names[-1], x)
    run_without_jaxnet(tmp_path, RELOAD, model, *names)
    return [np.load(name + ".out.npy") for name in names]


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_a_stablehlo_export_runs_without_jaxnet_at_any_batch_size_and_matches_predict(tmp_path, rng, which):
    net, shape = (mlp((32,), 10), (8, 8, 1)) if which == "mlp" else (
        cnn(10, channels=(4, 8), dense=16), (12, 12, 1))
    x = rng.normal(size=(7, *shape)).astype(np.float32)
    params = net.init(jax.random.key(0), x[:1])
    path = jn.export(net, params, x[:1], output=tmp_path / "model.stablehlo")
    y1, y7 = _reload_without_jaxnet(tmp_path, path, [x[:1], x])
    for got, inputs in ((y1, x[:1]), (y7, x)):
        want = jn.predict(net, params, inputs)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5
        assert (got.argmax(-1) == want.argmax(-1)).all()
    meta = json.loads((tmp_path / "model.stablehlo.json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["inputs"] == [{"name": "x", "shape": ["batch", *shape], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert meta["num_classes"] == 10 and meta["jax_version"] == jax.__version__
    assert meta["jaxnet_version"] == jn.__version__


def test_preprocessing_and_probabilities_are_folded_into_the_export(tmp_path, rng):
    net = mlp((16,), 3)
    raw = rng.uniform(0, 255, size=(5, 4, 2)).astype(np.float32)
    mean, std = np.float32(120.0), np.array([50.0, 70.0], np.float32)
    params = net.init(jax.random.key(0), raw[:1])
    path = jn.export(net, params, raw[:1], output=tmp_path / "m.bin", preprocess=(mean, std), proba=True)
    got = jax.export.deserialize(bytearray(path.read_bytes())).call(raw)
    want = jn.predict_proba(net, params, (raw - mean) / std)
    np.testing.assert_allclose(got, want, atol=1e-6)
    meta = json.loads((tmp_path / "m.bin.json").read_text())
    assert meta["outputs"][0]["name"] == "probabilities" and meta["preprocess"]["kind"] == "standardise"
    as_function = jn.export(net, params, raw[:1], output=tmp_path / "f.bin", proba=True,
                            preprocess=lambda x: (x - mean) / jax.numpy.asarray(std)[None, None])
    np.testing.assert_allclose(jax.export.deserialize(bytearray(as_function.read_bytes())).call(raw),
                               want, atol=1e-6)


def test_a_stateful_network_exports_in_evaluation_mode(tmp_path, rng):
    net = jn.serial(jn.Dense(6), jn.BatchNorm(), jn.relu, jn.Dense(2))
    x = rng.normal(size=(4, 3)).astype(np.float32)
    params, state = net.init_with_state(jax.random.key(0), x[:1])
    state = jax.tree.map(lambda v: v + 0.5, state)
    with pytest.raises(ValueError, match="pass the trained model_state"):
        jn.export(net, params, x[:1], output=tmp_path / "m")
    path = jn.export(net, params, x[:1], model_state=state, output=tmp_path / "m")
    got = jax.export.deserialize(bytearray(path.read_bytes())).call(x)
    np.testing.assert_allclose(got, jn.predict(net, params, x, model_state=state), atol=1e-6)


def test_an_existing_file_is_refused_unless_forced(tmp_path):
    net = mlp((), 2)
    params = net.init(jax.random.key(0), (1, 3))
    target = tmp_path / "m.stablehlo"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        jn.export(net, params, (1, 3), output=target)
    assert target.read_bytes() == b"old"
    jn.export(net, params, (1, 3), output=target, force=True)
    assert target.read_bytes() != b"old"


def test_a_bfloat16_forward_pass_exports_as_stablehlo_but_not_as_onnx(tmp_path, rng):
    net = mlp((16,), 3)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    params = net.init(jax.random.key(0), x[:1])
    path = jn.export(net, params, x[:1], output=tmp_path / "m", precision="bf16")
    got = jax.export.deserialize(bytearray(path.read_bytes())).call(x)
    np.testing.assert_allclose(got, jn.predict(net, params, x, precision="bf16"), atol=2e-2)
    assert not np.allclose(got, jn.predict(net, params, x), atol=1e-6)  # bfloat16 compute
    assert json.loads((tmp_path / "m.json").read_text())["precision"] == "bf16"
    with pytest.raises(ValueError, match="format='onnx' needs float32 compute, but precision "
                                         "bf16 computes in bfloat16"):
        jn.export(net, params, x[:1], output=tmp_path / "m.onnx", format="onnx", precision="bf16")
    assert not (tmp_path / "m.onnx").exists()


def test_an_unknown_format_names_the_allowed_ones(tmp_path):
    net = mlp((), 2)
    with pytest.raises(ValueError, match="'stablehlo', 'onnx'"):
        jn.export(net, net.init(jax.random.key(0), (1, 3)), (1, 3), format="tflite",
                  output=tmp_path / "m")


def test_a_failed_export_leaves_no_file_behind(tmp_path):
    net = mlp((), 2)

    def broken(x):
        raise RuntimeError("broken preprocessing")
    with pytest.raises(RuntimeError, match="broken preprocessing"):
        jn.export(net, net.init(jax.random.key(0), (1, 3)), (1, 3), preprocess=broken,
                  output=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ---- ONNX ------------------------------------------------------------------------------

def _onnx_session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


ONNX_NETS = {
    "dense_and_activations": (lambda: jn.serial(
        jn.Dense(8), jn.relu, jn.Dense(8), jn.gelu, jn.silu, jn.elu, jn.leaky_relu, jn.softplus,
        jn.sigmoid, jn.tanh, jn.Dense(4), jn.softmax, jn.log_softmax), (5,)),
    "conv_pool_norms": (lambda: jn.serial(
        jn.Conv2D(4, 3), jn.BatchNorm(), jn.relu, jn.MaxPool((2, 2)),
        jn.Conv2D(4, 3, strides=2, padding="VALID"), jn.LayerNorm(),
        jn.AvgPool((2, 2), strides=(1, 1), padding="SAME"), jn.Flatten(), jn.Dense(3)), (10, 10, 2)),
    "conv1d": (lambda: jn.serial(jn.Conv1D(3, 3), jn.MaxPool((2,)), jn.Flatten(), jn.Dense(2)), (8, 2)),
    "attention": (lambda: jn.serial(jn.MultiHeadAttention(2), jn.LayerNorm(), jn.Flatten(),
                                    jn.Dense(3)), (5, 8)),
    "lstm": (lambda: jn.serial(jn.LSTM(6), jn.Dense(3)), (5, 4)),
}


@pytest.mark.parametrize("name", sorted(ONNX_NETS))
def test_an_onnx_export_matches_the_network_in_onnxruntime_at_any_batch_size(tmp_path, rng, name):
    pytest.importorskip("jax2onnx")
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # jax2onnx's chatter about value types
    build, shape = ONNX_NETS[name]
    net = build()
    x = rng.normal(size=(7, *shape)).astype(np.float32)
    params, state = net.init_with_state(jax.random.key(0), x[:1])
    state = jax.tree.map(lambda v: v + 0.25, state)
    path = jn.export(net, params, x[:1], model_state=state, format="onnx", output=tmp_path / "m.onnx")
    session = _onnx_session(path)
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch axis
    want = serving_function(net, params, state)
    for batch in (1, 7):
        got = session.run(None, {"x": x[:batch]})[0]
        assert np.abs(got - np.asarray(want(x[:batch]))).max() <= 1e-5
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass(frozen=True, repr=False)
class MinPool(jn.nn.layer.Layer):
    """A layer whose reduce_window_min has no ONNX conversion in jax2onnx."""

    kind: ClassVar[str] = "min_pool"

    def forward(self, params, state, x, *, train, key):
        return lax.reduce_window(x, np.float32(np.inf), lax.min, (1, 2, 1), (1, 2, 1), "VALID"), state


def test_an_onnx_export_names_the_layer_it_cannot_express(tmp_path):
    pytest.importorskip("jax2onnx")
    net = jn.serial(jn.Dense(4), MinPool(), jn.Flatten(), jn.Dense(2))
    params = net.init(jax.random.key(0), (1, 4, 3))
    with pytest.raises(NotImplementedError, match=r"reduce_window_min.*min_pool \(min_pool_1"):
        jn.export(net, params, (1, 4, 3), format="onnx", output=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def _run_shell_block(block: str) -> None:
    """A ``sh`` block of ``jaxnet`` commands (comments after ``#``), each through the command's
    entry point."""
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "jaxnet", f"docs/export.md runs only jaxnet commands: {line}"
            assert main(words[1:]) == 0, line


def test_the_export_docs_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    blocks = re.findall(r"```(python|sh)\n(.*?)```", DOC.read_text(), re.S)
    languages = [language for language, _ in blocks]
    assert languages.count("python") >= 4 and languages.count("sh") >= 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        for language, block in blocks:  # as a user runs them, one after another
            if language == "sh":
                _run_shell_block(block)
            else:
                exec(compile(block, str(DOC), "exec"), namespace)
