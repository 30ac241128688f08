"""serial, parallel, residual and named: outputs against NumPy references, names, trees, keys and state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet as jn

TOL = dict(rtol=1e-5, atol=1e-5)


def _random_params(rng, net, key, x):
    """Random non-zero params (and state) in the shapes ``init_with_state`` gives; variances positive."""
    shapes = jax.eval_shape(lambda k: net.init_with_state(k, x), key)
    params, state = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    state = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.abs(v) + 0.5 if path[-1].key == "var" else v, state)
    return params, state


def _trace_init(net, key, x):
    """``net.init`` run abstractly: the same validation, without computing initial values."""
    return jax.eval_shape(lambda k: net.init(k, x), key)


def _input(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


# ---- NumPy float64 references of the leaf layers ------------------------------------------------

def f64(a):
    return np.asarray(a, np.float64)


def dense(p, x):
    return x @ f64(p["w"]) + f64(p["b"])


def relu(x):
    return np.maximum(x, 0)


def batch_norm(p, s, x, momentum=0.9, epsilon=1e-5):
    """Training mode: batch statistics over all axes but the last; returns (y, new_state)."""
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    y = (x - mean) / np.sqrt(var + epsilon) * f64(p["scale"]) + f64(p["bias"])
    new = {"mean": momentum * f64(s["mean"]) + (1 - momentum) * mean,
           "var": momentum * f64(s["var"]) + (1 - momentum) * var}
    return y, new


# ---- serial -----------------------------------------------------------------------------------

def test_serial_matches_reference(key, rng):
    net = jn.serial(jn.Dense(6), jn.relu, jn.Dense(5), jn.tanh, jn.Dense(3))
    x = _input(rng, 4, 7)
    params, _ = _random_params(rng, net, key, x[:1])
    assert set(params) == {"dense_1", "dense_2", "dense_3"}
    expected = dense(params["dense_3"], np.tanh(dense(params["dense_2"], relu(dense(params["dense_1"], f64(x))))))
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), expected, **TOL)


def test_plain_functions_become_layers(key, rng):
    net = jn.serial(jn.Dense(4), jax.nn.relu, jn.Dense(2), jnp.tanh)
    assert [name for name, _ in net.children()] == ["dense_1", "relu_1", "dense_2", "tanh_1"]
    x = _input(rng, 3, 5)
    params, _ = _random_params(rng, net, key, x[:1])
    expected = np.tanh(dense(params["dense_2"], relu(dense(params["dense_1"], f64(x)))))
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), expected, **TOL)


@pytest.mark.parametrize("net, names", [
    (jn.serial(jn.Dense(4), jn.relu, jn.Dense(4), jn.relu, jn.Dense(2)),
     ["dense_1", "relu_1", "dense_2", "relu_2", "dense_3"]),
    (jn.serial(jn.Flatten(), jn.Dense(4), jn.Dropout(0.1), jn.Dense(4), jn.Dropout(0.2), jn.softmax),
     ["flatten_1", "dense_1", "dropout_1", "dense_2", "dropout_2", "softmax_1"]),
    (jn.serial(jn.Dense(4), jn.named("head", jn.Dense(4)), jn.Dense(4), jn.residual(jn.Dense(4)),
               jn.parallel(jn.Dense(2), jn.Dense(2)), jn.parallel(jn.Dense(3))),
     ["dense_1", "head", "dense_2", "residual_1", "parallel_1", "parallel_2"]),
])
def test_automatic_names_count_per_kind(net, names, key):
    assert [name for name, _ in net.children()] == names
    # Every child shows up in the summary under its name (composites as the prefix of their leaves).
    summary_paths = [row.path for row in jn.summarize(net, (2, 4)).rows]
    first_seen = list(dict.fromkeys(path.split("/")[0] for path in summary_paths))
    assert first_seen == names


def test_empty_and_invalid_compositions():
    with pytest.raises(ValueError, match="serial: needs at least one layer"):
        jn.serial()
    with pytest.raises(ValueError, match="parallel: needs at least one branch"):
        jn.parallel()
    with pytest.raises(ValueError, match="parallel: fan_in must be one of concat, sum, tuple; got 'mean'"):
        jn.parallel(jn.Dense(2), fan_in="mean")
    with pytest.raises(TypeError, match="expected a jaxnet layer or a function; got 3 of type int"):
        jn.serial(jn.Dense(2), 3)


# ---- parallel ---------------------------------------------------------------------------------

def test_parallel_concat_matches_reference(key, rng):
    net = jn.serial(jn.Dense(5), jn.parallel(jn.Dense(3), jn.serial(jn.Dense(4), jn.relu), jn.tanh))
    x = _input(rng, 6, 2)
    params, _ = _random_params(rng, net, key, x[:1])
    branches = params["parallel_1"]
    assert set(branches) == {"dense_1", "serial_1"}  # the activation has no params and no entry
    h = dense(params["dense_1"], f64(x))
    expected = np.concatenate(
        [dense(branches["dense_1"], h), relu(dense(branches["serial_1"]["dense_1"], h)), np.tanh(h)], axis=-1)
    y = jax.jit(net.apply)(params, x)
    assert y.shape == (6, 3 + 4 + 5)
    np.testing.assert_allclose(y, expected, **TOL)


def test_parallel_sum_matches_reference(key, rng):
    net = jn.parallel(jn.Dense(4), jn.serial(jn.Dense(3), jn.relu, jn.Dense(4)), jn.Dense(4), fan_in="sum")
    x = _input(rng, 6, 5)
    params, _ = _random_params(rng, net, key, x[:1])
    expected = (dense(params["dense_1"], f64(x))
                + dense(params["serial_1"]["dense_2"], relu(dense(params["serial_1"]["dense_1"], f64(x))))
                + dense(params["dense_2"], f64(x)))
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), expected, **TOL)


@pytest.mark.parametrize("net, shape, message", [
    (jn.serial(jn.Dense(2), jn.parallel(jn.Dense(3), jn.Dense(4), fan_in="sum")), (1, 5),
     r"parallel_1: fan_in='sum' needs outputs of one shape; got dense_1 \(3,\), dense_2 \(4,\)"),
    (jn.parallel(jn.Dense(3), jn.named("wide", jn.Dense(4)), fan_in="sum"), (1, 5),
     r"parallel: fan_in='sum' .* got dense_1 \(3,\), wide \(4,\)"),
    (jn.serial(jn.parallel(jn.Flatten(), jn.Dense(3))), (1, 4, 5),
     r"parallel_1: fan_in='concat' joins the last axis and needs the other axes equal; "
     r"got flatten_1 \(20,\), dense_1 \(4, 3\)"),
    (jn.serial(jn.named("fork", jn.parallel(jn.Reshape((2, 3)), jn.Reshape((3, 2))))), (1, 6),
     r"fork: fan_in='concat' .* got reshape_1 \(2, 3\), reshape_2 \(3, 2\)"),
])
def test_parallel_mismatched_branches_name_them(net, shape, message, key):
    with pytest.raises(jn.ShapeError, match=message):
        _trace_init(net, key, shape)


# ---- residual ---------------------------------------------------------------------------------

def test_residual_matches_reference_and_keeps_body_params_in_its_slot(key, rng):
    net = jn.serial(jn.Dense(4), jn.residual(jn.Dense(6), jn.relu, jn.Dense(4)), jn.residual(jn.Dense(4)))
    x = _input(rng, 5, 3)
    params, _ = _random_params(rng, net, key, x[:1])
    assert set(params) == {"dense_1", "residual_1", "residual_2"}
    assert set(params["residual_1"]) == {"dense_1", "dense_2"}
    assert set(params["residual_2"]) == {"w", "b"}  # a one-layer body: no extra level
    h = dense(params["dense_1"], f64(x))
    h = h + dense(params["residual_1"]["dense_2"], relu(dense(params["residual_1"]["dense_1"], h)))
    expected = h + dense(params["residual_2"], h)
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), expected, **TOL)


@pytest.mark.parametrize("net, shape, message", [
    (jn.serial(jn.Dense(4), jn.residual(jn.Dense(3))), (1, 4),
     r"residual_1: a residual body must keep the input's shape and dtype: input \(4,\) float32, "
     r"body output \(3,\) float32"),
    (jn.residual(jn.Dense(8), jn.relu, jn.Dense(5)), (1, 4),
     r"residual: .* input \(4,\) float32, body output \(5,\) float32"),
    (jn.serial(jn.named("block", jn.residual(jn.Flatten()))), (1, 2, 2),
     r"block: .* input \(2, 2\) float32, body output \(4,\) float32"),
])
def test_residual_body_that_changes_shape_is_an_error(net, shape, message, key):
    with pytest.raises(jn.ShapeError, match=message):
        _trace_init(net, key, shape)


# ---- names ------------------------------------------------------------------------------------

def _encoder_net():
    encoder = jn.serial(jn.Dense(8), jn.relu, jn.Dropout(0.5), jn.Dense(4))
    return jn.serial(jn.named("encoder", encoder), jn.relu, jn.named("head", jn.Dense(2)))


def test_named_params_nest_under_the_name(key, rng):
    net = _encoder_net()
    x = _input(rng, 3, 5)
    params, _ = _random_params(rng, net, key, x[:1])
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"encoder": {"dense_1": {"w": (5, 8), "b": (8,)}, "dense_2": {"w": (8, 4), "b": (4,)}},
                      "head": {"w": (4, 2), "b": (2,)}}
    enc = params["encoder"]
    expected = dense(params["head"], relu(dense(enc["dense_2"], relu(dense(enc["dense_1"], f64(x))))))
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), expected, **TOL)
    assert [row.path for row in jn.summarize(net, x).rows] == [
        "encoder/dense_1", "encoder/relu_1", "encoder/dropout_1", "encoder/dense_2", "relu_1", "head"]


def test_error_messages_use_the_names(key, rng):
    net = _encoder_net()
    with pytest.raises(TypeError, match="encoder/dense_1: expected a floating-point input, got int32"):
        _trace_init(net, key, jnp.ones((1, 5), jnp.int32))
    params, _ = _random_params(rng, net, key, (1, 5))
    with pytest.raises(ValueError, match="encoder/dropout_1: Dropout in training mode needs a PRNG key"):
        net.apply(params, _input(rng, 3, 5), train=True)
    deep = jn.serial(jn.named("encoder", jn.serial(jn.Dense(8), jn.named("features", jn.Conv1D(4, 3)))))
    with pytest.raises(jn.ShapeError, match=r"encoder/features: expected examples of shape \(length, channels\)"):
        _trace_init(deep, key, (1, 5))


@pytest.mark.parametrize("build, duplicate", [
    (lambda: jn.serial(jn.named("a", jn.Dense(2)), jn.named("a", jn.Dense(3))), "a"),
    (lambda: jn.serial(jn.named("dense_1", jn.Dense(2)), jn.Dense(3)), "dense_1"),
    (lambda: jn.parallel(jn.relu, jn.named("relu_1", jn.Dense(3))), "relu_1"),
])
def test_duplicate_names_are_an_error(build, duplicate, key):
    with pytest.raises(ValueError, match=rf"duplicate layer names \['{duplicate}'\]"):
        _trace_init(build(), key, (1, 4))


@pytest.mark.parametrize("name", ["", "a/b", "a.b", 3])
def test_invalid_names(name):
    with pytest.raises(ValueError, match="named: a name must be a non-empty string without '/' or '.'"):
        jn.named(name, jn.Dense(2))


def test_nested_params_tree_structure(key):
    net = jn.serial(
        jn.Flatten(),
        jn.Dense(6),
        jn.parallel(jn.serial(jn.Dense(3), jn.relu), jn.named("skip", jn.Dense(2)), jn.relu),
        jn.residual(jn.Dense(4), jn.tanh, jn.Dense(11)),
        jn.named("out", jn.serial(jn.Dense(5), jn.Dense(1))))
    params = _trace_init(net, key, (1, 2, 3))
    assert jax.tree.map(lambda p: p.shape, params) == {
        "dense_1": {"w": (6, 6), "b": (6,)},
        "parallel_1": {"serial_1": {"dense_1": {"w": (6, 3), "b": (3,)}},
                       "skip": {"w": (6, 2), "b": (2,)}},
        "residual_1": {"dense_1": {"w": (11, 4), "b": (4,)}, "dense_2": {"w": (4, 11), "b": (11,)}},
        "out": {"dense_1": {"w": (11, 5), "b": (5,)}, "dense_2": {"w": (5, 1), "b": (1,)}},
    }
    assert net.output_shape((7, 2, 3)).shape == (7, 1)


# ---- randomness -------------------------------------------------------------------------------

def test_dropouts_across_branches_get_different_keys(key):
    width = 256
    net = jn.parallel(jn.Dropout(0.5), jn.Dropout(0.5), jn.named("deep", jn.serial(jn.Dropout(0.5), jn.Dropout(0.5))))
    x = jnp.ones((4, width), jnp.float32)
    apply = jax.jit(net.apply, static_argnames="train")
    y = np.asarray(apply({}, x, key=key, train=True))
    first, second, deep = (y[:, i * width:(i + 1) * width] != 0 for i in range(3))
    assert 0.4 < first.mean() < 0.6 and 0.4 < second.mean() < 0.6
    assert (first != second).mean() > 0.3  # independent masks disagree on about half the values
    # Two dropouts in series with independent keys keep about a quarter; with one key, a half.
    assert 0.18 < deep.mean() < 0.32
    assert not np.array_equal(deep, first) and not np.array_equal(deep, second)
    np.testing.assert_array_equal(apply({}, x, key=key, train=True), y)  # same key, same masks
    assert not np.array_equal(apply({}, x, key=jax.random.key(1), train=True), y)
    np.testing.assert_array_equal(apply({}, x), np.ones((4, 3 * width)))  # evaluation: identity


# ---- state ------------------------------------------------------------------------------------

def _stateful_net():
    return jn.serial(
        jn.Dense(4),
        jn.parallel(jn.serial(jn.BatchNorm(), jn.relu), jn.named("side", jn.serial(jn.Dense(4), jn.BatchNorm()))),
        jn.residual(jn.BatchNorm(momentum=0.5)))


def test_batch_norm_state_in_nested_composites(key, rng):
    net = _stateful_net()
    x = _input(rng, 6, 3)
    params, state = _random_params(rng, net, key, x[:1])
    assert jax.tree.map(jnp.shape, state) == {
        "parallel_1": {"serial_1": {"batch_norm_1": {"mean": (4,), "var": (4,)}},
                       "side": {"batch_norm_1": {"mean": (4,), "var": (4,)}}},
        "residual_1": {"mean": (8,), "var": (8,)}}
    apply = jax.jit(net.apply_with_state, static_argnames="train")

    y, new_state = apply(params, state, x, train=True)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(lambda a: (a.shape, a.dtype), state)
    # NumPy reference with the same params and state.
    p, s = params, state
    h = dense(p["dense_1"], f64(x))
    a, a_state = batch_norm(p["parallel_1"]["serial_1"]["batch_norm_1"], s["parallel_1"]["serial_1"]["batch_norm_1"], h)
    b, b_state = batch_norm(p["parallel_1"]["side"]["batch_norm_1"], s["parallel_1"]["side"]["batch_norm_1"],
                            dense(p["parallel_1"]["side"]["dense_1"], h))
    h = np.concatenate([relu(a), b], axis=-1)
    c, c_state = batch_norm(p["residual_1"], s["residual_1"], h, momentum=0.5)
    np.testing.assert_allclose(y, h + c, **TOL)
    expected_state = {"parallel_1": {"serial_1": {"batch_norm_1": a_state}, "side": {"batch_norm_1": b_state}},
                      "residual_1": c_state}
    jax.tree.map(lambda actual, expected: np.testing.assert_allclose(actual, expected, **TOL),
                 new_state, expected_state)

    _, eval_state = apply(params, state, x)  # evaluation mode: the same state comes back
    jax.tree.map(np.testing.assert_array_equal, eval_state, state)


def test_apply_on_a_stateful_network_names_the_stateful_layers(key, rng):
    net = _stateful_net()
    params, state = _random_params(rng, net, key, (1, 3))
    with pytest.raises(ValueError, match=r"this network keeps state \(parallel_1/serial_1/batch_norm_1, "
                                         r"parallel_1/side/batch_norm_1, residual_1\); use init_with_state"):
        net.apply(params, _input(rng, 2, 3))
    with pytest.raises(ValueError, match=r"missing state parallel_1\.serial_1\.batch_norm_1\.mean"):
        net.apply_with_state(params, {}, _input(rng, 2, 3))


def test_duplicate_names_fail_when_the_network_is_built():
    with pytest.raises(ValueError, match=r"duplicate layer names \['enc'\]"):
        jn.serial(jn.named("enc", jn.Dense(2)), jn.named("enc", jn.Dense(3)))
