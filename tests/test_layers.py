"""Dense, Embedding, Flatten, Reshape, Dropout and the weight initializers.

Every layer is checked against a NumPy float64 reference on random inputs, for
declared vs actual output shape, jit vs no-jit, batch vs vmap vs one example at a
time, extra leading batch axes, and finite-difference gradients in float64.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from jaxnet._xla import dense_ops as _dense_ops
from contract import assert_contract, f64, random_params

RTOL, ATOL = 1e-5, 1e-5  # float32 layer vs float64 reference


def dense_1(h, p):
    """The float64 reference of the layer named dense_1: ``h @ w + b``."""
    return h @ p["dense_1"]["w"] + p["dense_1"]["b"]


# ---- helpers ---------------------------------------------------------------------------

def random_like(tree, rng):
    """The same tree with random normal values, so that no check passes on zeros or ones."""
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), tree)


def initialise(net, key, shape):
    """``net.init(key, shape)`` compiled once, rather than one compilation per random op."""
    return jax.jit(net.init, static_argnums=1)(key, shape)


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)




# ---- Dense -----------------------------------------------------------------------------

@pytest.mark.parametrize("in_features, features, use_bias", [(1, 1, True), (5, 3, False), (7, 16, True)])
def test_dense_matches_numpy(rng, in_features, features, use_bias):
    net = jn.Dense(features, use_bias=use_bias)
    x = normal(rng, (6, in_features))
    params = random_params(net, x[:1], rng)
    assert params["w"].shape == (in_features, features)
    assert ("b" in params) == use_bias
    y = assert_contract(net, params, x)
    p = f64(params)
    expected = np.asarray(x, np.float64) @ p["w"] + (p["b"] if use_bias else 0.0)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


def test_dense_acts_on_last_axis_of_sequences(rng):
    net = jn.serial(jn.Dense(4), jn.relu, jn.Dense(2))
    x = normal(rng, (6, 5, 3))  # (batch, time, features)
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    p = f64(params)
    hidden = np.maximum(dense_1(np.asarray(x, np.float64), p), 0)
    expected = hidden @ p["dense_2"]["w"] + p["dense_2"]["b"]
    assert y.shape == (6, 5, 2)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_gradients(rng, use_bias):
    with jax.enable_x64(True):
        net = jn.serial(jn.Dense(4, use_bias=use_bias), jn.tanh, jn.Dense(3, use_bias=use_bias))
        x = normal(rng, (3, 5), jnp.float64)
        params = random_params(net, x[:1], rng)
        assert params["dense_1"]["w"].dtype == jnp.float64
        check_grads(jax.jit(net.apply), (params, x), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_params_follow_input_dtype(key, rng, dtype):
    net = jn.Dense(3)
    x = normal(rng, (2, 4), dtype)
    params = initialise(net, key, jax.ShapeDtypeStruct((1, 4), dtype))
    assert params["w"].dtype == dtype and params["b"].dtype == dtype
    assert net.apply(params, x).dtype == dtype
    assert net.output_shape(x).dtype == dtype


@pytest.mark.parametrize("features", [0, -3, 2.5, True, "4", None])
def test_dense_rejects_bad_features(features):
    with pytest.raises(ValueError, match=f"Dense: features must be a positive integer, got {features!r}"):
        jn.Dense(features)


def test_dense_rejects_integer_input_naming_the_layer(key, rng):
    net = jn.serial(jn.Flatten(), jn.Dense(3))
    with pytest.raises(TypeError, match=r"dense_1: expected a floating-point input, got int32 of shape \(1, 4\)"):
        net.init(key, jnp.zeros((1, 2, 2), jnp.int32))
    params = random_params(net, jnp.zeros((1, 2, 2)), rng)
    with pytest.raises(TypeError, match=r"dense_1: expected a floating-point input, got int32"):
        net.apply(params, jnp.zeros((5, 2, 2), jnp.int32))


def test_dense_rejects_examples_without_feature_axis(key):
    with pytest.raises(jn.ShapeError,
                       match=r"dense_1: expected examples with a feature axis .*got examples of shape \(\)"):
        jn.serial(jn.Dense(3)).init(key, (5,))
    with pytest.raises(jn.ShapeError, match=r"^dense: expected examples with a feature axis"):
        jn.Dense(3).init(key, (5,))


def test_dense_wrong_input_width_names_parameter_and_shapes(rng):
    net = jn.serial(jn.Dense(3), jn.relu, jn.Dense(2))
    params = random_params(net, jnp.zeros((1, 5)), rng)
    with pytest.raises(ValueError, match=r"dense_1\.w has shape \(5, 3\), expected \(7, 3\)"):
        net.apply(params, normal(rng, (4, 7)))


# ---- initializers ----------------------------------------------------------------------

FAN_IN, FAN_OUT = 384, 256

# name: (variance of w, distribution)
INIT_SCHEMES = {
    "he_normal": (2 / FAN_IN, "truncated_normal"),
    "he_uniform": (2 / FAN_IN, "uniform"),
    "glorot_normal": (2 / (FAN_IN + FAN_OUT), "truncated_normal"),
    "glorot_uniform": (2 / (FAN_IN + FAN_OUT), "uniform"),
    "lecun_normal": (1 / FAN_IN, "truncated_normal"),
    "lecun_uniform": (1 / FAN_IN, "uniform"),
    "pytorch": (1 / (3 * FAN_IN), "uniform"),  # uniform in ±1/sqrt(fan_in)
}


@pytest.mark.parametrize("name", sorted(INIT_SCHEMES))
def test_initializer_statistics(key, name):
    variance, distribution = INIT_SCHEMES[name]
    params = initialise(jn.Dense(FAN_OUT, weight_init=name), key, (1, FAN_IN))
    w = np.asarray(params["w"], np.float64)
    assert w.shape == (FAN_IN, FAN_OUT)
    std = math.sqrt(variance)
    # ~1e5 samples: the sample variance is within ~1% of the truth, the mean within ~0.01 std
    assert abs(w.var() / variance - 1) < 0.04, (name, w.var(), variance)
    assert abs(w.mean()) < 0.02 * std, (name, w.mean())
    if distribution == "uniform":
        bound = math.sqrt(3 * variance)
    else:  # jax truncates the standard normal at ±2 and rescales it to the target variance
        bound = 2 * std / 0.87962566103423978
    assert np.abs(w).max() <= bound * (1 + 1e-6), (name, np.abs(w).max(), bound)
    assert np.abs(w).max() > 0.99 * bound, (name, np.abs(w).max(), bound)
    if distribution == "uniform":  # flat: a quarter of the values in each quarter of the range
        counts, _ = np.histogram(w, bins=4, range=(-bound, bound))
        np.testing.assert_allclose(counts / w.size, 0.25, atol=0.01)
    else:  # truncated normal: about 68%/0.88 of it within one (untruncated) sigma
        inside = np.mean(np.abs(w) < std / 0.87962566103423978)
        assert abs(inside - 0.6827 / 0.9545) < 0.01, (name, inside)

    b = np.asarray(params["b"], np.float64)
    assert b.shape == (FAN_OUT,)
    if name == "pytorch":
        bound = 1 / math.sqrt(FAN_IN)
        assert np.abs(b).max() <= bound
        assert b.max() > 0.9 * bound and b.min() < -0.9 * bound, "biases should fill ±1/sqrt(fan_in)"
        assert abs(b.var() / (bound ** 2 / 3) - 1) < 0.3
    else:
        np.testing.assert_array_equal(b, 0)


def test_default_initializer_is_lecun_normal_and_follows_the_key(key):
    default = initialise(jn.Dense(FAN_OUT), key, (1, FAN_IN))["w"]
    lecun = initialise(jn.Dense(FAN_OUT, weight_init="lecun_normal"), key, (1, FAN_IN))["w"]
    np.testing.assert_array_equal(lecun, default)
    assert not np.allclose(initialise(jn.Dense(FAN_OUT), jax.random.key(1), (1, FAN_IN))["w"], default)


def test_callable_initializer(key, rng):
    calls = []
    table = rng.normal(size=(6, 4))

    def initializer(init_key, shape, dtype):
        calls.append((shape, jnp.dtype(dtype)))
        return jnp.asarray(table, dtype)

    params = jn.Dense(4, weight_init=initializer).init(key, (1, 6))
    assert calls == [((6, 4), jnp.dtype(jnp.float32))]
    np.testing.assert_allclose(params["w"], table, rtol=1e-6)
    np.testing.assert_array_equal(params["b"], 0)

    params = initialise(jn.Dense(4, weight_init=jax.nn.initializers.orthogonal()), key, (1, 6))
    np.testing.assert_allclose(params["w"].T @ params["w"], np.eye(4), atol=1e-5)


@pytest.mark.parametrize("weight_init", ["kaiming", "he", "", 3])
def test_unknown_initializer_raises(weight_init):
    with pytest.raises(ValueError, match=rf"Dense: unknown weight_init {weight_init!r}; choose one of .*'he_normal'"):
        jn.Dense(4, weight_init=weight_init)


# ---- Embedding -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.int64])
def test_embedding_table_is_float32_standard_normal(key, dtype):
    with jax.enable_x64(True):
        table = initialise(jn.Embedding(1000, 64), key, jax.ShapeDtypeStruct((1, 3), dtype))["table"]
    assert table.shape == (1000, 64) and table.dtype == jnp.float32, "ids of any width give float32 params"
    table = np.asarray(table, np.float64)
    assert abs(table.mean()) < 0.02 and abs(table.std() - 1) < 0.02
    assert np.unique(table, axis=0).shape == table.shape, "rows should be random and distinct"


@pytest.mark.parametrize("ids_shape, dtype", [((6,), jnp.int32), ((6, 5), jnp.uint8), ((6, 2, 3), jnp.int32)])
def test_embedding_looks_up_table_rows(rng, ids_shape, dtype):
    net = jn.Embedding(10, 4)
    ids = jnp.asarray(rng.integers(0, 10, size=ids_shape), dtype)
    params = random_params(net, ids[:1], rng)
    y = assert_contract(net, params, ids)
    np.testing.assert_array_equal(y, np.asarray(params["table"])[np.asarray(ids)])


def test_embedding_then_dense(rng):
    net = jn.serial(jn.Embedding(7, 4), jn.Dense(3))
    ids = jnp.asarray(rng.integers(0, 7, size=(6, 5)), jnp.int32)  # (batch, time)
    params = random_params(net, ids[:1], rng)
    y = assert_contract(net, params, ids)
    p = f64(params)
    expected = dense_1(p["embedding_1"]["table"][np.asarray(ids)], p)
    assert y.shape == (6, 5, 3)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad_id", [5, 6, 1000, -1, -5, -6])
def test_embedding_out_of_range_id_gives_nan(rng, bad_id):
    net = jn.Embedding(5, 3)
    ids = jnp.asarray([[0, bad_id, 4, 2]], jnp.int32)
    params = random_params(net, ids, rng)
    y = np.asarray(net.apply(params, ids))
    assert np.isnan(y[0, 1]).all(), f"id {bad_id} should give NaN, got {y[0, 1]}"
    table = np.asarray(params["table"])
    np.testing.assert_array_equal(y[0, [0, 2, 3]], table[[0, 4, 2]])
    np.testing.assert_array_equal(jax.jit(net.apply)(params, ids), y)


def test_embedding_gradient_is_scatter_add(rng):
    net = jn.Embedding(6, 3)
    ids = jnp.asarray(rng.integers(0, 6, size=(4, 5)), jnp.int32)
    params = random_params(net, ids[:1], rng)
    cotangent = rng.normal(size=(4, 5, 3))
    grads = jax.grad(lambda p: jnp.sum(net.apply(p, ids) * jnp.asarray(cotangent, jnp.float32)))(params)
    expected = np.zeros((6, 3))
    np.add.at(expected, np.asarray(ids), cotangent)
    np.testing.assert_allclose(grads["table"], expected, rtol=1e-5, atol=1e-5)
    # the table is float32 whatever the ids: finite differences in float32 on a linear map
    check_grads(lambda table: net.apply({"table": table}, ids), (params["table"],), order=1,
                modes=("fwd", "rev"), eps=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_])
def test_embedding_rejects_non_integer_ids(key, rng, dtype):
    with pytest.raises(TypeError, match=rf"embedding: expected integer ids, got {jnp.dtype(dtype)} of shape \(1, 3\)"):
        jn.Embedding(5, 3).init(key, jnp.zeros((1, 3), dtype))
    params = random_params(jn.serial(jn.Embedding(5, 3)), jnp.zeros((1, 3), jnp.int32), rng)
    with pytest.raises(TypeError, match="embedding_1: expected integer ids"):
        jn.serial(jn.Embedding(5, 3)).apply(params, jnp.zeros((2, 3), dtype))


@pytest.mark.parametrize("num_embeddings, features, bad", [(0, 3, "num_embeddings"), (-1, 3, "num_embeddings"),
                                                           (4.0, 3, "num_embeddings"), (4, 0, "features"),
                                                           (4, 1.5, "features")])
def test_embedding_rejects_bad_sizes(num_embeddings, features, bad):
    with pytest.raises(ValueError, match=f"Embedding: {bad} must be a positive integer"):
        jn.Embedding(num_embeddings, features)


# ---- Flatten and Reshape ---------------------------------------------------------------

@pytest.mark.parametrize("example", [(4,), (3, 4), (2, 3, 2)])
def test_flatten_then_dense_matches_numpy(rng, example):
    net = jn.serial(jn.Flatten(), jn.Dense(3))
    x = normal(rng, (6,) + example)
    params = random_params(net, x[:1], rng)
    assert params["dense_1"]["w"].shape == (math.prod(example), 3)
    y = assert_contract(net, params, x)
    p = f64(params)
    expected = dense_1(np.asarray(x, np.float64).reshape(6, -1), p)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, resolved", [((4, 5), (4, 5)), ((2, 2, 5), (2, 2, 5)), ((20,), (20,)),
                                             ((-1,), (20,))])
def test_reshape_then_dense_matches_numpy(rng, shape, resolved):
    net = jn.serial(jn.Reshape(shape), jn.Dense(3))
    x = normal(rng, (6, 20))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    p = f64(params)
    expected = dense_1(np.asarray(x, np.float64).reshape((6,) + resolved), p)
    assert y.shape == (6,) + resolved[:-1] + (3,)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, resolved", [((-1, 5), (4, 5)), ((2, -1, 5), (2, 2, 5))])
def test_reshape_with_a_free_size_asks_for_the_batch_axes(rng, shape, resolved):
    # (6, 20) is six examples of 20 values or one of 120: both fit Dense(3)'s (5, 3) weights
    net = jn.serial(jn.Reshape(shape), jn.Dense(3))
    x = normal(rng, (6, 20))
    params = random_params(net, x[:1], rng)
    with pytest.raises(jn.ShapeError, match=r"network: an input of shape \(6, 20\) fits these params "
                                            r"with 0 or 1 leading batch axes, and reshape_1 does not declare"):
        net.apply(params, x)
    y = net.apply(params, x, batch_ndim=1)
    expected = dense_1(np.asarray(x, np.float64).reshape((6,) + resolved), f64(params))
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(net.apply(params, x[0]), y[0], rtol=RTOL, atol=ATOL)  # one reading


def test_reshape_alone_infers_examples_from_its_size(rng):
    net = jn.Reshape((2, 3))
    x = normal(rng, (6, 6))
    y = assert_contract(net, {}, x)
    np.testing.assert_array_equal(y, np.asarray(x).reshape(6, 2, 3))


def test_reshape_and_flatten_round_trip(rng):
    net = jn.serial(jn.Reshape((3, -1)), jn.Flatten(), jn.Dense(2))
    x = normal(rng, (6, 12))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    p = f64(params)
    np.testing.assert_allclose(y, dense_1(np.asarray(x, np.float64), p), rtol=RTOL, atol=ATOL)


def test_flatten_reshape_gradients(rng):
    with jax.enable_x64(True):
        net = jn.serial(jn.Flatten(), jn.Dense(6), jn.Reshape((2, 3)))
        x = normal(rng, (3, 2, 2), jnp.float64)
        params = random_params(net, x[:1], rng)
        check_grads(jax.jit(net.apply), (params, x), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (-2, 4), (-1, -1), (2.5, 2), ("4",), (None,)])
def test_reshape_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"Reshape: shape must hold positive sizes and at most one -1, got "):
        jn.Reshape(shape)


@pytest.mark.parametrize("shape", [784, "28x28", None])
def test_reshape_rejects_non_tuple_shape(shape):
    with pytest.raises((TypeError, ValueError), match=rf"Reshape: shape must be a tuple of sizes.*got {shape!r}"):
        jn.Reshape(shape)


def test_reshape_size_mismatch_names_layer_and_shapes(key, rng):
    net = jn.serial(jn.Dense(15), jn.Reshape((4, 4)))
    with pytest.raises(jn.ShapeError,
                       match=r"reshape_1: cannot reshape examples of shape \(15,\) \(15 values\) to \(4, 4\)"):
        net.init(key, (1, 3))
    net = jn.serial(jn.Reshape((4, -1)), jn.Dense(2))
    with pytest.raises(jn.ShapeError,
                       match=r"reshape_1: cannot reshape examples of shape \(18,\) \(18 values\) to \(4, -1\)"):
        net.init(key, (1, 18))
    params = random_params(net, jnp.zeros((1, 20)), rng)
    with pytest.raises(jn.ShapeError, match=r"reshape_1: cannot reshape examples of shape \(21,\)"):
        net.apply(params, normal(rng, (2, 21)))


# ---- Dropout ---------------------------------------------------------------------------

def positive(rng, shape):
    """Values in [1, 2): never zero, so a zero in the output is a dropped value."""
    return jnp.asarray(1 + rng.uniform(size=shape), jnp.float32)


@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.9])
def test_dropout_is_identity_in_eval_mode(key, rng, drop_rate):
    net = jn.serial(jn.Dense(4), jn.Dropout(drop_rate))
    x = normal(rng, (6, 3))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    p = f64(params)
    np.testing.assert_allclose(y, dense_1(np.asarray(x, np.float64), p), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(net.apply(params, x, key=key), y)
    np.testing.assert_array_equal(jn.Dropout(drop_rate).apply({}, x), x)


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.8])
def test_dropout_drops_the_right_fraction_and_rescales(key, rng, drop_rate):
    x = positive(rng, (64, 512))
    y = np.asarray(jn.Dropout(drop_rate).apply({}, x, key=key, train=True))
    dropped = y == 0
    n = dropped.size  # the drop fraction is within 5 standard deviations of drop_rate
    assert abs(dropped.mean() - drop_rate) < 5 * math.sqrt(drop_rate * (1 - drop_rate) / n), dropped.mean()
    np.testing.assert_allclose(y[~dropped], np.asarray(x, np.float64)[~dropped] / (1 - drop_rate), rtol=1e-6)


@pytest.mark.parametrize("drop_rate", [0.25, 0.75])
def test_dropout_preserves_the_expectation(rng, drop_rate):
    x = positive(rng, (16,))
    keys = jax.random.split(jax.random.key(3), 4000)
    ys = jax.jit(jax.vmap(lambda k: jn.Dropout(drop_rate).apply({}, x, key=k, train=True)))(keys)
    ratio = np.asarray(ys, np.float64).mean(axis=0) / np.asarray(x, np.float64)  # per value, over keys
    sigma = math.sqrt(drop_rate / (1 - drop_rate) / len(keys))
    np.testing.assert_allclose(ratio, 1.0, atol=5 * sigma)


def test_dropout_masks_follow_the_key(key, rng):
    net = jn.Dropout(0.5)
    x = positive(rng, (8, 32))
    a = net.apply({}, x, key=key, train=True)
    np.testing.assert_array_equal(net.apply({}, x, key=key, train=True), a)
    np.testing.assert_array_equal(jax.jit(net.apply, static_argnames="train")({}, x, key=key, train=True), a)
    b = net.apply({}, x, key=jax.random.key(1), train=True)
    assert not np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0)


def test_dropout_accepts_raw_uint32_keys(rng):
    x = positive(rng, (8, 32))
    y = jn.Dropout(0.5).apply({}, x, key=jax.random.PRNGKey(0), train=True)
    assert 0 < np.mean(np.asarray(y) == 0) < 1


def test_two_dropouts_in_serial_get_different_keys(key, rng):
    x = positive(rng, (64, 256))
    y = np.asarray(jn.serial(jn.Dropout(0.5), jn.Dropout(0.5)).apply({}, x, key=key, train=True))
    # independent masks keep 1/4 of the values (scaled by 4); one shared mask would keep 1/2
    kept = y != 0
    assert abs(kept.mean() - 0.25) < 0.02, kept.mean()
    np.testing.assert_allclose(y[kept], 4 * np.asarray(x, np.float64)[kept], rtol=1e-6)


def test_dropout_in_parallel_branches_gets_different_keys(key, rng):
    x = positive(rng, (8, 64))
    y = np.asarray(jn.parallel(jn.Dropout(0.5), jn.Dropout(0.5)).apply({}, x, key=key, train=True))
    assert not np.array_equal(y[:, :64] == 0, y[:, 64:] == 0)


def test_dropout_gradients(key, rng):
    with jax.enable_x64(True):
        net = jn.serial(jn.Dense(5), jn.Dropout(0.4))
        x = normal(rng, (3, 4), jnp.float64)
        params = random_params(net, x[:1], rng)
        check_grads(jax.jit(lambda p, v: net.apply(p, v, key=key, train=True)), (params, x), order=1,
                    modes=("fwd", "rev"))


def test_dropout_without_key_in_train_mode_names_the_layer(rng):
    x = normal(rng, (2, 3))
    with pytest.raises(ValueError, match=r"^dropout: Dropout in training mode needs a PRNG key"):
        jn.Dropout(0.5).apply({}, x, train=True)
    net = jn.serial(jn.Dense(3), jn.Dropout(0.5), jn.relu, jn.Dropout(0.2))
    params = random_params(net, x[:1], rng)
    with pytest.raises(ValueError, match=r"^dropout_1: Dropout in training mode needs a PRNG key.*key=jax\.random"):
        net.apply(params, x, train=True)
    net = jn.serial(jn.Dense(3), jn.named("encoder", jn.serial(jn.Dense(3), jn.Dropout(0.5))))
    with pytest.raises(ValueError, match=r"^encoder/dropout_1: Dropout in training mode needs a PRNG key"):
        net.apply(random_params(net, x[:1], rng), x, train=True)


def test_dropout_zero_rate_needs_no_key(rng):
    x = normal(rng, (2, 3))
    assert not jn.Dropout(0.0).needs_key
    np.testing.assert_array_equal(jn.Dropout(0.0).apply({}, x, train=True), x)


@pytest.mark.parametrize("drop_rate", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
def test_dropout_rejects_bad_drop_rate(drop_rate):
    with pytest.raises(ValueError, match=rf"Dropout: drop_rate must be in \[0, 1\), got {drop_rate!r}"):
        jn.Dropout(drop_rate)


# ---- the layer values themselves ---------------------------------------------------------

@pytest.mark.parametrize("layer", [jn.Dense(3), jn.Embedding(4, 2), jn.Flatten(), jn.Reshape((2, -1)),
                                   jn.Dropout(0.5)])
def test_layers_are_hashable_and_comparable(layer):
    again = type(layer)(*[getattr(layer, field.name) for field in dataclasses.fields(layer)])
    assert again == layer and hash(again) == hash(layer)
    assert eval(repr(layer), {**vars(jn)}) == layer


@pytest.mark.parametrize("shape, features", [((32, 64), 32), ((16, 512), 10), ((8, 40), 130),
                                             ((2, 5, 6), 3)])
def test_reverse_only_dense_gradients_equal_plain_ones(rng, shape, features):
    """Narrow layers (< _dense_ops.NARROW outputs) take the transposed weight gradient on CPU,
    wide ones the plain one; both equal plain autodiff, with batch axes flattened."""
    layer = jn.Dense(features)
    x = normal(rng, shape)
    params = random_params(layer, x.reshape(-1, shape[-1])[:1], rng)
    g = normal(rng, shape[:-1] + (features,))

    def pullback(reverse_only):
        apply = lambda p, v: layer.apply_with_state(p, {}, v, reverse_only=reverse_only)[0]
        return jax.vjp(apply, params, x)[1](g)

    for got, want in zip(jax.tree.leaves(jax.jit(pullback, static_argnums=0)(True)),
                         jax.tree.leaves(pullback(False))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reverse_only_dense_matches_numpy_float64_and_vmaps(rng):
    with jax.enable_x64(True):
        x, w = normal(rng, (6, 7), jnp.float64), normal(rng, (7, 3), jnp.float64)
        g = normal(rng, (6, 3), jnp.float64)
        dx, dw = jax.vjp(_dense_ops.matmul, x, w)[1](g)
        np.testing.assert_allclose(dw, np.asarray(x).T @ np.asarray(g), rtol=1e-12)
        np.testing.assert_allclose(dx, np.asarray(g) @ np.asarray(w).T, rtol=1e-12)
        check_grads(_dense_ops.matmul, (x, w), order=2, modes=["rev"])
        per_example = jax.vmap(jax.grad(lambda w, v: jnp.sum(_dense_ops.matmul(v, w) ** 2)),
                               (None, 0))(w, x)
        expected = [2 * np.outer(v, v @ np.asarray(w)) for v in np.asarray(x)]
        np.testing.assert_allclose(per_example, expected, rtol=1e-12)


def test_reverse_only_has_no_forward_mode(rng):
    layer = jn.Dense(3)
    x = normal(rng, (2, 4))
    params = random_params(layer, x[:1], rng)
    apply = lambda p: layer.apply_with_state(p, {}, x, reverse_only=True)[0]
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(apply, (params,), (params,))
    jax.jvp(lambda p: layer.apply(p, x, train=True), (params,), (params,))  # the default has it
