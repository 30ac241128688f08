import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet as jn
from jaxnet.inference import _compiled_forward, chunk_size, predict, predict_proba, predict_to_file
from support import count_compiles


def mlp(width=16, classes=5):
    return jn.serial(jn.Flatten(), jn.Dense(width), jn.tanh, jn.Dense(classes))


def numpy_mlp(params, x):
    """The same MLP written in NumPy float64: the reference."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    h = np.tanh(x.reshape(len(x), -1) @ p["dense_1"]["w"] + p["dense_1"]["b"])
    return h @ p["dense_2"]["w"] + p["dense_2"]["b"]


@pytest.fixture
def setup(key, rng):
    net = mlp()
    x = rng.normal(size=(103, 4, 3)).astype(np.float32)
    return net, net.init(key, x[:1]), x


@pytest.mark.parametrize("batch_size", [1, 16, 50, 103, 200])
def test_equals_a_numpy_float64_forward_for_any_batch_size(key, rng, batch_size):
    net = mlp()
    x = rng.normal(size=(103, 4, 3))  # 103: not a multiple of 16 or 50
    with jax.enable_x64(True):
        params = net.init(key, x[:1])
        y = predict(net, params, x, batch_size=batch_size)
    assert y.dtype == np.float64 and y.shape == (103, 5)
    np.testing.assert_allclose(y, numpy_mlp(params, x), rtol=1e-12, atol=1e-12)


def test_equals_one_full_batch_apply_in_float32(setup):
    net, params, x = setup
    y = predict(net, params, x, batch_size=16)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_allclose(y, net.apply(params, x), rtol=1e-5, atol=1e-6)


def test_jax_array_input_gives_a_jax_array(setup):
    net, params, x = setup
    for batch_size in (16, 103, 1000):
        y = predict(net, params, jnp.asarray(x), batch_size=batch_size)
        assert isinstance(y, jax.Array) and y.shape == (103, 5)
        np.testing.assert_allclose(y, net.apply(params, x), rtol=1e-5, atol=1e-6)


def test_memory_mapped_input_and_output_file(setup, tmp_path):
    net, params, x = setup
    np.save(tmp_path / "x.npy", x)
    inputs = np.load(tmp_path / "x.npy", mmap_mode="r")
    expected = net.apply(params, x)
    np.testing.assert_allclose(predict(net, params, inputs, batch_size=32), expected,
                               rtol=1e-5, atol=1e-6)
    written = predict_to_file(net, params, inputs, tmp_path / "y.npy", batch_size=32)
    assert written == tmp_path / "y.npy"
    np.testing.assert_allclose(np.load(written), expected, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "y.npy"]  # no temporary file left


def test_out_takes_a_preallocated_array_or_memmap(setup, tmp_path):
    net, params, x = setup
    out = np.full((103, 5), np.nan, np.float64)  # float32 outputs fit a float64 array
    assert predict(net, params, x, batch_size=32, out=out) is out
    np.testing.assert_allclose(out, net.apply(params, x), rtol=1e-5, atol=1e-6)
    mapped = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.float32,
                                       shape=(103, 5))
    predict(net, params, x, batch_size=32, out=mapped)
    mapped.flush()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), out, rtol=1e-6)


def test_one_compilation_serves_every_chunk_and_later_calls(key, rng):
    net = mlp(width=11)  # a network no other test compiled
    x = rng.normal(size=(80, 4, 3)).astype(np.float32)
    params = net.init(key, x[:1])
    predict(net, params, x[:2], batch_size=32)  # warm up the one-time helpers (keys, tracing)
    before = _compiled_forward(False)._cache_size()
    with count_compiles() as compiles:
        first = predict(net, params, x, batch_size=32)  # chunks of 32, 32, 16 padded to 32
    assert compiles[0] == 1 and _compiled_forward(False)._cache_size() == before + 1
    with count_compiles() as compiles:
        for n in (33, 64, 79, 80):
            np.testing.assert_array_equal(predict(net, params, x[:n], batch_size=32), first[:n])
    assert compiles[0] == 0 and _compiled_forward(False)._cache_size() == before + 1


def test_small_inputs_round_up_to_a_power_of_two():
    assert [chunk_size(n, 8192) for n in (0, 1, 2, 3, 5, 8, 9, 5000, 8192, 10**6)] == [
        1, 1, 2, 4, 8, 8, 16, 8192, 8192, 8192]
    assert chunk_size(100, 96) == 96 and chunk_size(70, 96) == 96


def test_proba_sums_to_one_and_equals_softmax(setup):
    net, params, x = setup
    probs = predict_proba(net, params, x, batch_size=16)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)
    np.testing.assert_allclose(probs, jax.nn.softmax(net.apply(params, x)), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(probs, predict(net, params, x, batch_size=16, proba=True))


def test_stateful_network_uses_the_model_state(key, rng):
    net = jn.serial(jn.Dense(8), jn.BatchNorm(), jn.relu, jn.Dense(3))
    x = rng.normal(size=(45, 6)).astype(np.float32)
    params, state = net.init_with_state(key, x[:1])
    _, state = net.apply_with_state(params, state, x, train=True)  # non-trivial statistics
    expected, _ = net.apply_with_state(params, state, x)
    got = predict(net, params, x, model_state=state, batch_size=16)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_preprocess_runs_on_each_chunk(setup):
    net, params, x = setup
    raw = np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    seen = []

    def scale(chunk):
        seen.append(chunk.shape)
        return chunk.astype(np.float32) / 255

    y = predict(net, params, raw, batch_size=40, preprocess=scale)
    np.testing.assert_allclose(y, net.apply(params, raw.astype(np.float32) / 255), rtol=1e-5,
                               atol=1e-6)
    assert seen == [(1, 4, 3), (40, 4, 3), (40, 4, 3), (23, 4, 3)]  # first: the example probe


def test_no_inputs_give_an_empty_result(setup, tmp_path):
    net, params, x = setup
    assert predict(net, params, x[:0]).shape == (0, 5)
    assert predict(net, params, jnp.asarray(x[:0])).shape == (0, 5)
    assert np.load(predict_to_file(net, params, x[:0], tmp_path / "y.npy")).shape == (0, 5)


def test_progress_bar_counts_inputs(setup, capsys):
    net, params, x = setup
    predict(net, params, x, batch_size=32, progress=True)
    err = capsys.readouterr().err
    assert "predict" in err and "103/103" in err


def test_a_failure_leaves_no_output_file(setup, tmp_path):
    net, params, x = setup
    (tmp_path / "y.npy").write_bytes(b"previous")

    def fail_late(chunk):
        if len(chunk) == 23:  # the last chunk
            raise RuntimeError("disk gone")
        return chunk

    with pytest.raises(RuntimeError, match="disk gone"):
        predict_to_file(net, params, x, tmp_path / "y.npy", batch_size=40, preprocess=fail_late)
    assert os.listdir(tmp_path) == ["y.npy"] and (tmp_path / "y.npy").read_bytes() == b"previous"


def test_wrong_example_shape_names_the_shapes(setup):
    net, params, x = setup
    with pytest.raises(ValueError, match=r"input of shape \(103, 4, 4\): dense_1.w has shape "
                                         r"\(12, 16\), expected \(16, 16\)"):
        predict(net, params, np.ones((103, 4, 4), np.float32))


def test_one_example_without_an_input_axis_is_refused(setup):
    net, params, x = setup
    with pytest.raises(ValueError, match=r"x must be \(n, \*example\).*shape \(4, 3\), as a "
                                         r"single example.*x\[None\]"):
        predict(net, params, x[0])
    with pytest.raises(ValueError, match="got a scalar"):
        predict(net, params, np.float32(1))


def test_integer_inputs_name_the_layer_and_the_real_shape(setup):
    net, params, x = setup
    with pytest.raises(TypeError, match=r"dense_1: expected a floating-point input, got uint8 of "
                                        r"shape \(1, 12\)"):
        predict(net, params, x.astype(np.uint8))


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size(setup, batch_size):
    net, params, x = setup
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {batch_size!r}"):
        predict(net, params, x, batch_size=batch_size)


def test_stateful_network_without_state(key, rng):
    net = jn.serial(jn.Dense(4), jn.BatchNorm())
    params, _ = net.init_with_state(key, np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="keeps state.*pass the trained model_state"):
        predict(net, params, np.ones((5, 3), np.float32))


def test_bad_out_arrays(setup):
    net, params, x = setup
    with pytest.raises(ValueError, match=r"out has shape \(103, 4\), expected \(103, 5\)"):
        predict(net, params, x, out=np.empty((103, 4), np.float32))
    with pytest.raises(TypeError, match="out has dtype int32; the outputs are float32"):
        predict(net, params, x, out=np.empty((103, 5), np.int32))
    with pytest.raises(TypeError, match="out must be a writable NumPy array.*got ArrayImpl"):
        predict(net, params, x, out=jnp.zeros((103, 5)))
    frozen = np.empty((103, 5), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="out must be a writable NumPy array"):
        predict(net, params, x, out=frozen)


def test_preprocess_must_keep_the_rows(setup):
    net, params, x = setup
    with pytest.raises(ValueError, match=r"preprocess must return one row per input row; given 1 "
                                         r"rows it returned shape \(2, 4, 3\)"):
        predict(net, params, x, preprocess=lambda c: np.concatenate([c, c]))


def test_predict_takes_a_dict_of_inputs_in_chunks():
    net = jn.serial(jn.route(image=jn.serial(jn.Flatten(), jn.Dense(6)), meta=jn.Dense(6)),
                    jn.join("sum"), jn.Dense(3))
    rng = np.random.default_rng(0)
    x = {"image": rng.normal(size=(37, 4, 4)).astype(np.float32),
         "meta": rng.normal(size=(37, 5)).astype(np.float32)}
    params = net.init(jax.random.key(0), x)
    expected = net.apply(params, x)
    np.testing.assert_allclose(jn.predict(net, params, x, batch_size=16), expected, rtol=1e-5, atol=1e-6)
    on_device = jn.predict(net, params, jax.tree.map(jnp.asarray, x), batch_size=16, proba=True)
    np.testing.assert_allclose(on_device, jax.nn.softmax(expected), rtol=1e-5, atol=1e-6)


def test_predict_refuses_inputs_of_different_lengths_naming_them():
    net = jn.serial(jn.route(a=jn.Dense(2), b=jn.Dense(2)), jn.join())
    x = {"a": np.zeros((5, 3), np.float32), "b": np.zeros((4, 3), np.float32)}
    params = net.init(jax.random.key(0), jax.tree.map(lambda v: v[:1], x))
    with pytest.raises(ValueError, match=r"predict: every input array needs the same number of "
                                         r"rows; found x\['a'\] 5, x\['b'\] 4"):
        jn.predict(net, params, x)
