"""LayerNorm and BatchNorm against NumPy float64 references.

BatchNorm is checked in both modes: training uses the batch's statistics and returns
running averages updated with ``new = momentum * old + (1 - momentum) * batch``;
evaluation uses the running averages and returns the state unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract_with_state

RTOL, ATOL = 1e-4, 1e-5  # float32 layer vs float64 reference on O(1) outputs


# ---- helpers ---------------------------------------------------------------------------

def normal(rng, shape, dtype=jnp.float32, loc=0.0, scale=1.0):
    return jnp.asarray(rng.normal(loc, scale, size=shape), dtype)


def random_params_and_state(net, x, rng):
    """Random params and state of the shapes ``init_with_state`` gives; variances positive."""
    shapes = jax.eval_shape(net.init_with_state, jax.random.key(0), x)

    def fill(path, leaf):
        values = rng.normal(size=leaf.shape)
        if jax.tree_util.keystr(path).endswith("['var']"):
            values = rng.uniform(0.5, 2.0, size=leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def f64(tree):
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)


def normalise(x, mean, var, scale, bias, epsilon):
    """NumPy float64 reference; statistics broadcast over the last axis."""
    y = (x - mean) / np.sqrt(var + epsilon)
    return y * (1.0 if scale is None else scale) + (0.0 if bias is None else bias)


def layer_norm_reference(x, params, epsilon):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    p = f64(params)
    return normalise(x, mean, var, p.get("scale"), p.get("bias"), epsilon)


def batch_norm_reference(x, params, state, momentum, epsilon):
    """Training mode: ``(y, new_state)`` with statistics over every axis but the last."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    p, s = f64(params), f64(state)
    y = normalise(x, mean, var, p.get("scale"), p.get("bias"), epsilon)
    new_state = {"mean": momentum * s["mean"] + (1 - momentum) * mean,
                 "var": momentum * s["var"] + (1 - momentum) * var}
    return y, new_state


# ---- LayerNorm -------------------------------------------------------------------------

@pytest.mark.parametrize("shape, epsilon, use_scale, use_bias", [
    ((6, 8), 1e-5, True, True),
    ((6, 4, 5), 0.5, True, False),  # a large epsilon must show in the output
    ((6, 1, 3), 1e-3, False, False),
])
def test_layer_norm_matches_numpy(rng, shape, epsilon, use_scale, use_bias):
    net = jn.LayerNorm(epsilon=epsilon, use_scale=use_scale, use_bias=use_bias)
    x = normal(rng, shape, loc=2.0, scale=3.0)
    params, state = random_params_and_state(net, x[:1], rng)
    assert state == {}
    assert sorted(params) == sorted(name for name, used in (("scale", use_scale), ("bias", use_bias)) if used)
    y = assert_contract_with_state(net, params, state, x, rtol=1e-5)
    np.testing.assert_allclose(y, layer_norm_reference(x, params, epsilon), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(net.apply(params, x, train=True), y, rtol=1e-6, atol=1e-6)


def test_layer_norm_init_and_dtype(key):
    with jax.enable_x64(True):
        params = jn.LayerNorm().init(key, jax.ShapeDtypeStruct((1, 3, 7), jnp.float64))
    assert params["scale"].dtype == params["bias"].dtype == jnp.float64
    np.testing.assert_array_equal(params["scale"], np.ones(7))
    np.testing.assert_array_equal(params["bias"], np.zeros(7))


def test_layer_norm_in_a_network(rng):
    net = jn.serial(jn.Dense(6), jn.LayerNorm(), jn.relu, jn.Dense(3))
    x = normal(rng, (6, 4))
    params, state = random_params_and_state(net, x[:1], rng)
    y = assert_contract_with_state(net, params, state, x, rtol=1e-5)
    p = f64(params)
    hidden = np.asarray(x, np.float64) @ p["dense_1"]["w"] + p["dense_1"]["b"]
    hidden = np.maximum(layer_norm_reference(hidden, params["layer_norm_1"], 1e-5), 0)
    np.testing.assert_allclose(y, hidden @ p["dense_2"]["w"] + p["dense_2"]["b"], rtol=RTOL, atol=ATOL)


def test_layer_norm_of_constant_examples_is_the_bias(rng):
    net = jn.LayerNorm()
    x = jnp.asarray(np.repeat(rng.normal(size=(4, 1)), 5, axis=1), jnp.float32)  # each row constant
    params, _ = random_params_and_state(net, x[:1], rng)
    y = net.apply(params, x)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(y, np.broadcast_to(np.asarray(params["bias"]), (4, 5)), atol=1e-5)


def test_layer_norm_gradients(rng):
    with jax.enable_x64(True):
        net = jn.serial(jn.Dense(5), jn.LayerNorm(use_bias=False), jn.Dense(2))
        x = normal(rng, (3, 4), jnp.float64)
        params, _ = random_params_and_state(net, x[:1], rng)
        assert params["dense_1"]["w"].dtype == params["layer_norm_1"]["scale"].dtype == jnp.float64
        check_grads(jax.jit(net.apply), (params, x), order=1, modes=("fwd", "rev"))
        # second order through the normalisation itself
        net = jn.LayerNorm(epsilon=1e-3)
        params, _ = random_params_and_state(net, x[:1], rng)
        check_grads(jax.jit(net.apply), (params, x), order=2, modes=("rev",))


@pytest.mark.parametrize("epsilon", [0, 0.0, -1e-5, float("nan")])
def test_layer_norm_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match=rf"LayerNorm: epsilon must be positive, got {epsilon!r}"):
        jn.LayerNorm(epsilon=epsilon)


def test_layer_norm_input_errors_name_the_layer(key):
    with pytest.raises(jn.ShapeError, match=r"layer_norm_1: expected examples with a feature axis .*"
                                            r"got examples of shape \(\)"):
        jn.serial(jn.LayerNorm()).init(key, (4,))
    with pytest.raises(TypeError, match=r"layer_norm_1: expected a floating-point input, got int32 of shape \(1, 3\)"):
        jn.serial(jn.LayerNorm()).init(key, jnp.zeros((1, 3), jnp.int32))


# ---- BatchNorm -------------------------------------------------------------------------

@pytest.mark.parametrize("shape, momentum, epsilon", [
    ((8, 5), 0.9, 1e-5),          # dense features
    ((6, 4, 3), 0.0, 1e-5),       # sequences; momentum 0 keeps only the batch statistics
    ((4, 3, 3, 2), 0.9, 1e-5),    # images: per channel, over batch, height and width
    ((4, 3, 3, 2), 0.5, 0.3),     # a large epsilon must show in the output
])
def test_batch_norm_training_uses_batch_statistics(rng, shape, momentum, epsilon):
    net = jn.BatchNorm(momentum=momentum, epsilon=epsilon)
    x = normal(rng, shape, loc=1.5, scale=2.0)
    params, state = random_params_and_state(net, x[:1], rng)
    assert state["mean"].shape == state["var"].shape == params["scale"].shape == (shape[-1],)
    y, new_state = net.apply_with_state(params, state, x, train=True)
    expected_y, expected_state = batch_norm_reference(x, params, state, momentum, epsilon)
    np.testing.assert_allclose(y, expected_y, rtol=RTOL, atol=ATOL)
    for name in ("mean", "var"):
        np.testing.assert_allclose(new_state[name], expected_state[name], rtol=RTOL, atol=ATOL)
    # the normalised (unscaled) channels have mean 0 and variance ~1 over the batch
    unscaled = (np.asarray(y, np.float64) - f64(params)["bias"]) / f64(params)["scale"]
    np.testing.assert_allclose(unscaled.reshape(-1, shape[-1]).mean(axis=0), 0, atol=1e-4)

    step = jax.jit(net.apply_with_state, static_argnames="train")
    jitted_y, jitted_state = step(params, state, x, train=True)
    np.testing.assert_allclose(jitted_y, y, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jitted_state, new_state)


@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 3, 2)], ids=["dense", "image"])
def test_batch_norm_evaluation_uses_running_statistics(rng, shape):
    net = jn.BatchNorm(epsilon=1e-3)
    x = normal(rng, shape, loc=-1.0, scale=2.0)
    params, state = random_params_and_state(net, x[:1], rng)
    y = assert_contract_with_state(net, params, state, x, rtol=1e-5)
    p, s = f64(params), f64(state)
    expected = normalise(np.asarray(x, np.float64), s["mean"], s["var"], p["scale"], p["bias"], 1e-3)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


def test_batch_norm_init(key):
    params, state = jn.BatchNorm().init_with_state(key, (1, 4, 4, 3))
    np.testing.assert_array_equal(params["scale"], np.ones(3))
    np.testing.assert_array_equal(params["bias"], np.zeros(3))
    np.testing.assert_array_equal(state["mean"], np.zeros(3))
    np.testing.assert_array_equal(state["var"], np.ones(3))
    params, state = jn.BatchNorm(use_scale=False, use_bias=False).init_with_state(key, (1, 3))
    assert params == {} and sorted(state) == ["mean", "var"]
    with jax.enable_x64(True):
        params, state = jn.BatchNorm().init_with_state(key, jax.ShapeDtypeStruct((1, 3), jnp.float64))
    assert params["scale"].dtype == state["mean"].dtype == state["var"].dtype == jnp.float64


def test_batch_norm_training_with_extra_batch_axes_pools_them(rng):
    net = jn.BatchNorm()
    x = normal(rng, (2, 3, 4), loc=0.5)  # (2, 3) batch axes, 4 channels
    params, state = random_params_and_state(net, x[:1], rng)
    y, new_state = net.apply_with_state(params, state, x, train=True)
    flat_y, flat_state = net.apply_with_state(params, state, x.reshape(6, 4), train=True)
    assert y.shape == (2, 3, 4)
    np.testing.assert_allclose(y.reshape(6, 4), flat_y, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state, flat_state)


def test_batch_norm_in_a_network_keeps_state_by_path(rng):
    net = jn.serial(jn.Dense(5), jn.BatchNorm(momentum=0.8), jn.relu, jn.Dense(2), jn.BatchNorm())
    x = normal(rng, (6, 3))
    params, state = random_params_and_state(net, x[:1], rng)
    assert sorted(state) == ["batch_norm_1", "batch_norm_2"]
    y, new_state = net.apply_with_state(params, state, x, train=True)
    p = f64(params)
    hidden = np.asarray(x, np.float64) @ p["dense_1"]["w"] + p["dense_1"]["b"]
    hidden, state_1 = batch_norm_reference(hidden, params["batch_norm_1"], state["batch_norm_1"], 0.8, 1e-5)
    hidden = np.maximum(hidden, 0) @ p["dense_2"]["w"] + p["dense_2"]["b"]
    expected, state_2 = batch_norm_reference(hidden, params["batch_norm_2"], state["batch_norm_2"], 0.9, 1e-5)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    for name, expected_state in (("batch_norm_1", state_1), ("batch_norm_2", state_2)):
        for stat in ("mean", "var"):
            np.testing.assert_allclose(new_state[name][stat], expected_state[stat], rtol=RTOL, atol=ATOL)
    y_eval = assert_contract_with_state(net, params, new_state, x)
    assert not np.allclose(y_eval, y), "evaluation should use the running statistics, not the batch's"


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 2)], ids=["dense", "image"])
def test_batch_norm_axis_name_under_vmap_matches_the_full_batch(rng, shape):
    net = jn.serial(jn.Dense(shape[-1]), jn.BatchNorm(momentum=0.7, axis_name="batch"))
    x = normal(rng, shape, loc=1.0, scale=2.0)
    params, state = random_params_and_state(net, x[:1], rng)
    full_batch = jn.serial(jn.Dense(shape[-1]), jn.BatchNorm(momentum=0.7))  # the same, not mapped
    full_y, full_state = full_batch.apply_with_state(params, state, x, train=True)
    expected_y, expected_state = batch_norm_reference(
        np.asarray(x, np.float64) @ f64(params)["dense_1"]["w"] + f64(params)["dense_1"]["b"],
        params["batch_norm_1"], state["batch_norm_1"], 0.7, 1e-5)
    np.testing.assert_allclose(full_y, expected_y, rtol=RTOL, atol=ATOL)

    def one_example(example):
        return net.apply_with_state(params, state, example, train=True)

    mapped_y, mapped_state = jax.jit(jax.vmap(one_example, axis_name="batch"))(x)
    np.testing.assert_allclose(mapped_y, full_y, rtol=RTOL, atol=ATOL)
    for stat in ("mean", "var"):
        per_example = np.asarray(mapped_state["batch_norm_1"][stat])  # (batch, channels), all equal
        np.testing.assert_allclose(per_example, np.broadcast_to(full_state["batch_norm_1"][stat], per_example.shape),
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(full_state["batch_norm_1"][stat], expected_state[stat], rtol=RTOL, atol=ATOL)


def test_batch_norm_without_axis_name_under_vmap_sees_one_example(rng):
    """The reason for axis_name: mapped one at a time, each example is its own batch."""
    net = jn.BatchNorm(use_bias=False, use_scale=False)
    x = normal(rng, (4, 3))
    params, state = net.init_with_state(jax.random.key(0), x[:1])
    y, _ = jax.vmap(lambda v: net.apply_with_state(params, state, v, train=True))(x)
    np.testing.assert_allclose(y, np.zeros((4, 3)), atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_gradients(rng, train):
    with jax.enable_x64(True):
        net = jn.serial(jn.Dense(4), jn.BatchNorm(), jn.tanh, jn.Dense(2))
        x = normal(rng, (5, 3), jnp.float64)
        params, state = random_params_and_state(net, x[:1], rng)
        assert state["batch_norm_1"]["mean"].dtype == jnp.float64
        apply = jax.jit(lambda p, v: net.apply_with_state(p, state, v, train=train)[0])
        check_grads(apply, (params, x), order=1, modes=("fwd", "rev"))


def test_running_statistics_carry_no_gradient(rng):
    net = jn.BatchNorm()
    x = normal(rng, (6, 3))
    params, state = random_params_and_state(net, x[:1], rng)
    grad = jax.grad(lambda v: jnp.sum(net.apply_with_state(params, state, v, train=True)[1]["mean"]))(x)
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_apply_on_a_stateful_network_names_the_stateful_layers(rng):
    x = normal(rng, (4, 3))
    params, _ = random_params_and_state(jn.BatchNorm(), x[:1], rng)
    with pytest.raises(ValueError, match=r"^batch_norm: this network keeps state \(batch_norm\); use "
                                         r"init_with_state\(key, x\) and apply_with_state"):
        jn.BatchNorm().apply(params, x)
    net = jn.serial(jn.Dense(3), jn.BatchNorm(), jn.relu, jn.named("head", jn.serial(jn.Dense(2), jn.BatchNorm())))
    params, _ = random_params_and_state(net, x[:1], rng)
    with pytest.raises(ValueError, match=r"keeps state \(batch_norm_1, head/batch_norm_1\)"):
        net.apply(params, x)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, float("nan")])
def test_batch_norm_rejects_bad_momentum(momentum):
    with pytest.raises(ValueError, match=rf"BatchNorm: momentum must be in \[0, 1\), got {momentum!r}"):
        jn.BatchNorm(momentum=momentum)


@pytest.mark.parametrize("epsilon", [0, -1e-3, float("nan")])
def test_batch_norm_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match=rf"BatchNorm: epsilon must be positive, got {epsilon!r}"):
        jn.BatchNorm(epsilon=epsilon)


def test_batch_norm_input_errors_name_the_layer(key):
    net = jn.serial(jn.Flatten(), jn.BatchNorm())
    with pytest.raises(TypeError, match=r"batch_norm_1: expected a floating-point input, got int32 of shape \(1, 6\)"):
        net.init_with_state(key, jnp.zeros((1, 2, 3), jnp.int32))
    with pytest.raises(jn.ShapeError, match=r"^batch_norm: expected examples with a feature axis .*"
                                            r"got examples of shape \(\)"):
        jn.BatchNorm().init_with_state(key, (4,))


@pytest.mark.parametrize("layer", [jn.LayerNorm(), jn.LayerNorm(epsilon=1e-3, use_bias=False),
                                   jn.BatchNorm(), jn.BatchNorm(momentum=0.5, axis_name="batch")])
def test_norm_layers_are_values(layer):
    assert eval(repr(layer), {**vars(jn)}) == layer
    assert hash(eval(repr(layer), {**vars(jn)})) == hash(layer)
