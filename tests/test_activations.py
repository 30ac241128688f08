"""Activations as functions and as layers, against NumPy float64 references.

``gelu`` is jax.nn.gelu's default, the tanh approximation; ``leaky_relu`` has slope
0.01 and ``elu`` alpha 1 (jax.nn's defaults); softmax and log_softmax act on the last axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64, random_params


def np_sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


def np_log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


REFERENCES = {  # name: (layer, float64 reference, elementwise)
    "sigmoid": (jn.sigmoid, np_sigmoid, True),
    "relu": (jn.relu, lambda x: np.maximum(x, 0), True),
    "tanh": (jn.tanh, np.tanh, True),
    "gelu": (jn.gelu, lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), True),
    "silu": (jn.silu, lambda x: x * np_sigmoid(x), True),
    "elu": (jn.elu, lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))), True),
    "leaky_relu": (jn.leaky_relu, lambda x: np.where(x > 0, x, 0.01 * x), True),
    "softplus": (jn.softplus, lambda x: np.logaddexp(0, x), True),
    "softmax": (jn.softmax, lambda x: np.exp(np_log_softmax(x)), False),
    "log_softmax": (jn.log_softmax, np_log_softmax, False),
}
NAMES = sorted(REFERENCES)
RTOL, ATOL = 1e-5, 1e-6


def away_from_zero(rng, shape, dtype=jnp.float32, scale=1.0):
    """Random values with |x| >= 0.1: clear of the kinks of relu, leaky_relu and elu at 0."""
    magnitude = 0.1 + np.abs(rng.normal(size=shape))
    return jnp.asarray(scale * np.where(rng.uniform(size=shape) < 0.5, -magnitude, magnitude), dtype)




# ---- as functions ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_function_matches_numpy(rng, name):
    activation, reference, elementwise = REFERENCES[name]
    for shape in [(2, 3, 4), (5,)] + ([()] if elementwise else []):
        x = away_from_zero(rng, shape, scale=2.0)
        y = activation(x)
        assert y.shape == x.shape and y.dtype == x.dtype, (name, shape)
        np.testing.assert_allclose(y, reference(np.asarray(x, np.float64)), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{name} on {shape}")


@pytest.mark.parametrize("name", NAMES)
def test_function_is_stable_for_large_inputs(rng, name):
    activation, reference, _ = REFERENCES[name]
    x = away_from_zero(rng, (2, 3, 4), scale=40.0)  # exp(|x|) overflows float32 for |x| > 88
    y = np.asarray(activation(x))
    assert np.isfinite(y).all(), name
    np.testing.assert_allclose(y, reference(np.asarray(x, np.float64)), rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_acts_on_the_last_axis(rng, name):
    activation, _, _ = REFERENCES[name]
    x = away_from_zero(rng, (3, 4, 5))
    probabilities = np.exp(np.asarray(activation(x), np.float64)) if name == "log_softmax" else activation(x)
    np.testing.assert_allclose(np.sum(probabilities, axis=-1), np.ones((3, 4)), rtol=1e-5)
    shifted = activation(x + 7.0)  # invariant to a constant added along the last axis
    np.testing.assert_allclose(shifted, activation(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_function_gradients(rng, name):
    activation, _, _ = REFERENCES[name]
    with jax.enable_x64(True):
        x = away_from_zero(rng, (3, 4), jnp.float64)
        assert activation(x).dtype == jnp.float64
        check_grads(jax.jit(activation), (x,), order=1, modes=("fwd", "rev"))


# ---- as layers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_layer_alone_matches_numpy(rng, name):
    activation, reference, _ = REFERENCES[name]
    assert isinstance(activation, jn.Activation) and activation.kind == name and repr(activation) == name
    x = away_from_zero(rng, (6, 5))
    y = assert_contract(activation, {}, x)
    np.testing.assert_allclose(y, reference(np.asarray(x, np.float64)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(activation.apply({}, x, train=True), y, rtol=1e-6, atol=1e-6)
    assert activation.init(jax.random.key(0), x[:1]) == {}


@pytest.mark.parametrize("name", NAMES)
def test_layer_in_serial_matches_numpy(rng, name):
    activation, reference, _ = REFERENCES[name]
    net = jn.serial(jn.Dense(4), activation, jn.Dense(3))
    x = away_from_zero(rng, (6, 2, 5))  # (batch, time, features): acts per position
    params = random_params(net, x[:1], rng)
    assert sorted(params) == ["dense_1", "dense_2"], "activations have no params"
    y = net.apply(params, x)  # jit, vmap and single examples: see test_layer_alone_matches_numpy
    assert y.shape == net.output_shape(x).shape == (6, 2, 3)
    p = f64(params)
    hidden = reference(np.asarray(x, np.float64) @ p["dense_1"]["w"] + p["dense_1"]["b"])
    np.testing.assert_allclose(y, hidden @ p["dense_2"]["w"] + p["dense_2"]["b"], rtol=1e-4, atol=1e-5)
    assert [row.path for row in jn.summarize(net, x).rows] == ["dense_1", f"{name}_1", "dense_2"]


@pytest.mark.parametrize("name", ["gelu", "softmax", "elu"])
def test_layer_gradients(rng, name):
    activation, _, _ = REFERENCES[name]
    with jax.enable_x64(True):
        net = jn.serial(jn.Dense(4), activation, jn.Dense(2))
        x = away_from_zero(rng, (3, 5), jnp.float64)
        params = random_params(net, x[:1], rng)
        assert params["dense_1"]["w"].dtype == jnp.float64
        check_grads(jax.jit(net.apply), (params, x), order=1, modes=("fwd", "rev"))


def test_same_activation_twice_gets_numbered_names():
    net = jn.serial(jn.Dense(4), jn.relu, jn.Dense(4), jn.relu, jn.tanh)
    paths = [row.path for row in jn.summarize(net, (1, 3)).rows]
    assert paths == ["dense_1", "relu_1", "dense_2", "relu_2", "tanh_1"]


# ---- Activation(fn) and plain functions in serial ----------------------------------------

def cube(x):
    return x * x * x


def normalise_rows(x):
    """A last-axis function: each example scaled to unit length."""
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def test_custom_activation_layer(rng):
    layer = jn.Activation(cube)
    assert layer.kind == "cube" and repr(layer) == "cube"
    assert layer == jn.Activation(cube) and hash(layer) == hash(jn.Activation(cube))
    x = away_from_zero(rng, (6, 3))
    np.testing.assert_allclose(layer(x), np.asarray(x, np.float64) ** 3, rtol=1e-5)
    y = assert_contract(layer, {}, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) ** 3, rtol=1e-5)
    with jax.enable_x64(True):
        check_grads(layer.apply, ({}, away_from_zero(rng, (2, 3), jnp.float64)), order=2, modes=("fwd", "rev"))


def test_custom_last_axis_activation_sees_one_example_at_a_time(rng):
    layer = jn.Activation(normalise_rows, name="unit")
    assert layer.kind == "unit" and repr(layer) == "unit"
    x = away_from_zero(rng, (6, 4))
    y = assert_contract(layer, {}, x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, x64 / np.linalg.norm(x64, axis=-1, keepdims=True), rtol=1e-5)


def test_named_custom_activation_in_serial(rng):
    swish = jn.Activation(functools.partial(jax.nn.swish), name="swish")
    net = jn.serial(jn.Dense(3), swish, jn.Dense(2), swish)
    x = away_from_zero(rng, (6, 4))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    p = f64(params)
    hidden = np.asarray(x, np.float64) @ p["dense_1"]["w"] + p["dense_1"]["b"]
    hidden = hidden * np_sigmoid(hidden) @ p["dense_2"]["w"] + p["dense_2"]["b"]
    np.testing.assert_allclose(y, hidden * np_sigmoid(hidden), rtol=1e-4, atol=1e-5)
    assert [row.path for row in jn.summarize(net, x).rows] == ["dense_1", "swish_1", "dense_2", "swish_2"]
    assert jn.Activation(functools.partial(jax.nn.leaky_relu, negative_slope=0.2)).kind == "activation"


@pytest.mark.parametrize("fn, name", [(jax.nn.relu, "relu"), (jnp.tanh, "tanh"), (cube, "cube"),
                                      (jax.nn.softmax, "softmax")])
def test_serial_wraps_plain_functions(rng, fn, name):
    net = jn.serial(jn.Dense(4), fn, jn.Dense(2))
    assert isinstance(net.layers[1], jn.Activation) and net.layers[1].fn is fn
    x = away_from_zero(rng, (6, 3))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    p = f64(params)
    hidden = np.asarray(fn(np.asarray(x, np.float64) @ p["dense_1"]["w"] + p["dense_1"]["b"]), np.float64)
    np.testing.assert_allclose(y, hidden @ p["dense_2"]["w"] + p["dense_2"]["b"], rtol=1e-4, atol=1e-5)
    assert jn.summarize(net, x).rows[1].path == f"{name}_1"


def test_wrapped_function_equals_the_named_activation(rng):
    x = away_from_zero(rng, (6, 3))
    wrapped, named = jn.serial(jn.Dense(4), jax.nn.relu), jn.serial(jn.Dense(4), jn.relu)
    params = random_params(named, x[:1], rng)
    np.testing.assert_array_equal(wrapped.apply(params, x), named.apply(params, x))


def test_activation_needs_a_feature_axis(key):
    """A layer output without a feature axis (one value per example) names the activation."""
    net = jn.serial(jn.Dense(3), jn.Activation(lambda x: x[..., 0], name="first"), jn.softmax)
    with pytest.raises(jn.ShapeError, match=r"^softmax_1: expected examples with a feature axis .*"
                                            r"got examples of shape \(\)"):
        net.init(key, (1, 4))
    with pytest.raises(jn.ShapeError, match=r"^relu: expected examples with a feature axis"):
        jn.relu.init(key, (5,))


@pytest.mark.parametrize("fn", [3, "relu", None, np.ones(3)])
def test_non_callables_are_rejected(fn):
    with pytest.raises(TypeError, match=r"^Activation: fn must be callable, got "):
        jn.Activation(fn)
    with pytest.raises(TypeError, match=rf"expected a jaxnet layer or a function; got .* of type {type(fn).__name__}"):
        jn.serial(jn.Dense(2), fn)
