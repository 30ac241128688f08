"""GlobalAvgPool and GlobalMaxPool against NumPy and PyTorch, plus transforms, gradients and errors."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from jaxnet._xla import options as xla_options
from contract import assert_contract, random_params

LAYERS = {"avg": jn.GlobalAvgPool, "max": jn.GlobalMaxPool}
NUMPY = {"avg": np.mean, "max": np.max}
SPATIAL = [(5,), (4, 3), (3, 2, 4), (1, 1)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("spatial", SPATIAL, ids=str)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_matches_numpy_over_every_spatial_axis(kind, spatial, keepdims, rng):
    x = jnp.asarray(rng.normal(size=(2, *spatial, 3)), jnp.float32)
    layer = LAYERS[kind](keepdims=keepdims)
    y = jax.jit(layer.apply)({}, x)
    axes = tuple(range(1, 1 + len(spatial)))
    expected = NUMPY[kind](np.asarray(x, np.float64), axis=axes, keepdims=keepdims)
    assert (y.shape, y.dtype) == (expected.shape, jnp.float32)
    assert y.shape == ((2,) + (1,) * len(spatial) + (3,) if keepdims else (2, 3))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert layer.output_shape(x).shape == y.shape


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_matches_torch_adaptive_pooling_to_one(kind, rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    pool = torch.nn.AdaptiveAvgPool2d(1) if kind == "avg" else torch.nn.AdaptiveMaxPool2d(1)
    expected = pool(torch.tensor(np.moveaxis(x, -1, 1))).numpy()  # (2, 3, 1, 1)
    np.testing.assert_allclose(LAYERS[kind]().apply({}, x), expected[:, :, 0, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(LAYERS[kind](keepdims=True).apply({}, x), np.moveaxis(expected, 1, -1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_contract_after_a_convolution(kind, keepdims, rng):
    # Alone, a rank-free layer reads (a, b, c) as a batch of a examples; the conv fixes the rank.
    net = jn.serial(jn.Conv2D(4, 3), LAYERS[kind](keepdims=keepdims), jn.Dense(2))
    x = jnp.asarray(rng.normal(size=(6, 5, 4, 3)), jnp.float32)
    y = assert_contract(net, random_params(net, x[:1], rng), x)
    assert y.shape == ((6, 1, 1, 2) if keepdims else (6, 2))


def test_after_only_pointwise_layers_the_batch_axes_must_be_given(key, rng):
    net = jn.serial(jn.Dense(4), jn.GlobalAvgPool())
    x = jnp.asarray(rng.normal(size=(6, 5, 3)), jnp.float32)
    params = net.init(key, x[:1])
    with pytest.raises(jn.ShapeError, match="global_avg_pool_1 does not declare how many axes form one example"):
        net.apply(params, x)
    expected = np.mean(np.asarray(x) @ np.asarray(params["dense_1"]["w"]), axis=1)
    np.testing.assert_allclose(net.apply(params, x, batch_ndim=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_forward_under_vmap_pools_each_example_alone(kind, rng):
    # The layer protocol's forward (one leading batch axis) mapped over examples: no mixing.
    layer = LAYERS[kind]()
    x = jnp.asarray(rng.normal(size=(3, 4, 5, 2)), jnp.float32)
    y, _ = layer.forward({}, {}, x, train=False, key=None)
    per_example = jax.jit(jax.vmap(lambda v: layer.forward({}, {}, v[None], train=False, key=None)[0][0]))(x)
    np.testing.assert_allclose(per_example, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_gradients(kind, rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 4, 2)), jnp.float64)
        check_grads(lambda v: LAYERS[kind](keepdims=True).apply({}, v), (x,), order=2, modes=("rev",))


def test_global_max_pool_splits_the_gradient_between_tied_maxima():
    x = jnp.asarray([[[1.0], [3.0], [3.0], [0.0]]], jnp.float32)  # (1, 4, 1)
    grad = jax.grad(lambda v: jnp.sum(jn.GlobalMaxPool().apply({}, v)))(x)
    np.testing.assert_array_equal(grad.ravel(), [0, 0.5, 0.5, 0])



def _with_nans(rng, shape):
    """Normal values with a NaN in about one in five examples' channels, as NumPy gets them."""
    x = rng.normal(size=shape).astype(np.float32)
    x[rng.random(shape) < 0.2 / math.prod(shape[1:-1])] = np.nan
    return x


@pytest.mark.parametrize("where", ["eager", "jit", "jaxnet program"])
def test_global_max_pool_keeps_nan_as_numpy(where, rng):
    """XLA:CPU's max reduction drops NaN at these sizes (docs/performance.md, finding 22)."""
    x = _with_nans(rng, (512, 7, 7, 16))
    layer = jn.GlobalMaxPool()
    compile_ = {"eager": lambda f: f, "jit": jax.jit, "jaxnet program": xla_options.jit}[where]
    y = np.asarray(compile_(layer.apply)({}, jnp.asarray(x)))
    expected = np.max(x, axis=(1, 2))
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_array_equal(y, expected)
    grad = np.asarray(compile_(jax.grad(lambda v: jnp.sum(layer.apply({}, v))))(jnp.asarray(x)))
    # the gradient goes to the NaN inputs, and to the maximum where there are none
    np.testing.assert_array_equal(grad, np.where(np.isnan(x) | (x == expected[:, None, None]),
                                                 1.0, 0.0))


def test_global_max_pool_keeps_integer_inputs_integer():
    x = jnp.arange(24, dtype=jnp.int32).reshape(2, 4, 3)
    y = jn.GlobalMaxPool().apply({}, x)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y, np.asarray(x).max(axis=1))


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_flops_are_one_per_input_value(kind):
    row, = jn.summarize(LAYERS[kind](), jnp.zeros((2, 5, 4, 3), jnp.float32)).rows
    assert (row.output_shape, row.flops, row.parameters) == ((2, 3), 2 * 5 * 4 * 3, 0)


def test_global_pools_are_distinct_descriptions():
    assert jn.GlobalAvgPool() == jn.GlobalAvgPool() and jn.GlobalAvgPool() != jn.GlobalMaxPool()
    assert repr(jn.GlobalMaxPool(keepdims=True)) == "GlobalMaxPool(keepdims=True)"
    assert jn.serial(jn.GlobalAvgPool(), jn.GlobalAvgPool(keepdims=True)).children()[1][0] == "global_avg_pool_2"


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["avg", "max"])
def test_keepdims_must_be_a_bool(kind):
    name = LAYERS[kind].__name__
    with pytest.raises(TypeError, match=re.escape(f"{name}: keepdims must be True or False, got 1")):
        LAYERS[kind](keepdims=1)


@pytest.mark.parametrize("kind, name", [("avg", "global_avg_pool"), ("max", "global_max_pool")])
def test_examples_without_a_spatial_axis_are_rejected(kind, name, key):
    with pytest.raises(jn.ShapeError, match=re.escape(
            f"{name}: expected examples of shape (*spatial, channels) with at least one spatial axis; "
            "got examples of shape (3,) (rank 1)")):
        LAYERS[kind]().init(key, (2, 3))
    with pytest.raises(jn.ShapeError, match=re.escape(f"{name}_1: expected examples of shape (*spatial")):
        jn.serial(jn.Dense(4), LAYERS[kind]()).init(key, (2, 3))


def test_global_avg_pool_of_integers_is_a_type_error(key):
    with pytest.raises(TypeError, match="global_avg_pool: expected a floating-point input, got int32"):
        jn.GlobalAvgPool().init(key, jnp.ones((1, 4, 3), jnp.int32))
