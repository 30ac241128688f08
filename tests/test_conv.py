"""Conv1D/Conv2D, MaxPool and AvgPool against NumPy float64 references, plus shapes, transforms and errors."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from jaxnet._xla import options as xla_options

# float32 results against float64 references summing at most a few dozen products of O(1) values.
TOL = dict(rtol=2e-5, atol=2e-5)


# ---- independent NumPy references (float64) ----------------------------------------------------

def _pads(spatial, window, strides, dilation, padding):
    """(low, high) padding per spatial axis, as XLA defines SAME: output size ceil(n / stride)."""
    if padding == "VALID":
        return [(0, 0)] * len(spatial)
    if padding == "SAME":
        pads = []
        for n, k, s, d in zip(spatial, window, strides, dilation):
            effective = (k - 1) * d + 1
            total = max((-(-n // s) - 1) * s + effective - n, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(padding, int):
        return [(padding, padding)] * len(spatial)
    return list(padding)


def _windows(x, window, strides, dilation, padding, fill):
    """Yields (output index, window values of shape (batch, *window, channels)) of a padded x."""
    spatial = x.shape[1:-1]
    pads = _pads(spatial, window, strides, dilation, padding)
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)], constant_values=fill)
    effective = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    out = [(n + lo + hi - e) // s + 1 for n, (lo, hi), e, s in zip(spatial, pads, effective, strides)]
    for index in itertools.product(*map(range, out)):
        slices = tuple(slice(i * s, i * s + e, d) for i, s, e, d in zip(index, strides, effective, dilation))
        yield out, index, xp[(slice(None),) + slices + (slice(None),)]


def conv_reference(x, w, b, strides, padding, dilation, groups):
    """x (N, *S, C), w (*K, C/G, F), b (F,) or None -> (N, *S_out, F), all float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    *kernel, in_per_group, features = w.shape
    n = x.shape[0]
    # Split channels and features into groups: w (*K, C/G, G, F/G).
    w_groups = w.reshape(*kernel, in_per_group, groups, features // groups)
    result = None
    for out, index, window in _windows(x, kernel, strides, dilation, padding, 0.0):
        if result is None:
            result = np.zeros((n, *out, features))
        window = window.reshape(n, *kernel, groups, in_per_group)  # channel c = g * (C/G) + i
        k_axes = "".join("hw"[: len(kernel)])
        y = np.einsum(f"n{k_axes}gi,{k_axes}igf->ngf", window, w_groups)
        result[(slice(None),) + index] = y.reshape(n, features)
    if b is not None:
        result = result + np.asarray(b, np.float64)
    return result


def pool_reference(x, window, strides, padding, kind):
    """Max or mean of the real (unpadded) values of each window; padding is NaN and ignored."""
    x = np.asarray(x, np.float64)
    reduce = np.nanmax if kind == "max" else np.nanmean
    result = None
    for out, index, values in _windows(x, window, strides, (1,) * len(window), padding, np.nan):
        if result is None:
            result = np.zeros((x.shape[0], *out, x.shape[-1]))
        result[(slice(None),) + index] = reduce(values, axis=tuple(range(1, 1 + len(window))))
    return result


def _random_params(rng, layer, key, x):
    """Random non-zero values in the shapes ``layer.init`` gives (so biases are non-zero too)."""
    shapes = jax.eval_shape(lambda k: layer.init(k, x), key)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), shapes)


def test_references_agree_with_hand_computed_values():
    # 1-D, one channel, kernel [1, 2], SAME with an even kernel pads (0, 1): [1*1+2*2, 2+2*3, 3+0].
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    w = np.array([1.0, 2.0]).reshape(2, 1, 1)
    np.testing.assert_array_equal(conv_reference(x, w, None, (1,), "SAME", (1,), 1).ravel(), [5, 8, 3])
    np.testing.assert_array_equal(pool_reference(x, (2,), (1,), "SAME", "avg").ravel(), [1.5, 2.5, 3])
    np.testing.assert_array_equal(pool_reference(x, (2,), (2,), ((1, 0),), "max").ravel(), [1, 3])


# ---- convolution -------------------------------------------------------------------------------

CONV_CASES = [
    # (spatial, in_channels, features, kernel, keyword arguments)
    ((7, 6), 3, 4, 3, {}),
    ((7, 6), 3, 4, (3, 2), dict(padding="VALID")),
    ((7, 6), 2, 5, (3, 2), dict(strides=(2, 1))),
    ((8, 7), 2, 3, 3, dict(strides=2, padding="VALID")),
    ((7, 6), 3, 4, 4, dict(strides=3)),  # even kernel: SAME pads unevenly
    ((5, 6), 2, 3, 3, dict(padding=1)),
    ((5, 6), 2, 3, (2, 3), dict(padding=((1, 2), (0, 1)), strides=(1, 2))),
    ((7, 7), 2, 3, 3, dict(dilation=2)),
    ((7, 6), 2, 3, (2, 3), dict(dilation=(2, 1), padding="VALID")),
    ((6, 6), 4, 6, 3, dict(feature_group_count=2)),
    ((6, 5), 3, 6, 3, dict(feature_group_count=3)),  # depthwise, channel multiplier 2
    ((6, 5), 3, 4, 2, dict(use_bias=False)),
    ((9,), 3, 4, 3, {}),
    ((9,), 3, 4, 4, dict(padding="VALID", strides=2)),
    ((9,), 2, 3, 2, dict(strides=3)),
    ((8,), 2, 3, 3, dict(padding=2)),
    ((8,), 2, 3, 3, dict(padding=((0, 3),), dilation=2)),
    ((10,), 4, 4, 3, dict(dilation=3, padding="VALID")),
    ((8,), 4, 2, 3, dict(feature_group_count=2)),
    ((8,), 4, 4, 3, dict(feature_group_count=4, strides=2)),  # depthwise
]


def _conv(spatial, features, kernel, kwargs):
    return (jn.Conv1D if len(spatial) == 1 else jn.Conv2D)(features, kernel, **kwargs)


def _conv_setup(case, key, rng, batch=2, dtype=jnp.float32):
    spatial, channels, features, kernel, kwargs = case
    layer = _conv(spatial, features, kernel, kwargs)
    x = jnp.asarray(rng.normal(size=(batch, *spatial, channels)), dtype)
    return layer, _random_params(rng, layer, key, x[:1]), x


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-k{c[3]}-{c[4]}")
def test_conv_matches_numpy_reference(case, key, rng):
    layer, params, x = _conv_setup(case, key, rng)
    y = jax.jit(layer.apply)(params, x)
    expected = conv_reference(x, params["w"], params.get("b"), layer.strides, layer.padding,
                              layer.dilation, layer.feature_group_count)
    assert y.shape == expected.shape
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, **TOL)
    declared = layer.output_shape(x)
    assert (declared.shape, declared.dtype) == (y.shape, y.dtype)
    assert jn.summarize(jn.serial(layer), x).rows[0].output_shape == y.shape


@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (2, 10, 14, 19)],
                         ids=lambda c: f"{c[0]}-k{c[3]}-{c[4]}")
def test_conv_jit_vmap_and_one_example_agree(case, key, rng):
    layer, params, x = _conv_setup(case, key, rng, batch=3)
    y = layer.apply(params, x)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(layer.apply, (None, 0))(params, x), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.apply(params, x[1]), y[1], rtol=1e-6, atol=1e-6)
    stacked = jnp.stack([x[:2], x[1:]])  # two leading batch axes
    np.testing.assert_allclose(layer.apply(params, stacked)[1], y[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-k{c[3]}-{c[4]}")
def test_conv_summary_flops_are_analytic(case, key, rng):
    layer, _, x = _conv_setup(case, key, rng)
    _, channels, _, _, _ = case
    y_shape = layer.output_shape(x).shape
    row, = jn.summarize(layer, x).rows
    expected = 2 * math.prod(y_shape) * math.prod(layer.kernel_size) * channels // layer.feature_group_count
    assert row.flops == expected
    assert row.parameters == sum(p.size for p in jax.tree.leaves(_random_params(rng, layer, key, x[:1])))


@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (6, 10, 16)],
                         ids=lambda c: f"{c[0]}-k{c[3]}-{c[4]}")
def test_conv_gradients(case, key, rng):
    with jax.enable_x64(True):
        layer, params, x = _conv_setup(case, key, rng, batch=2, dtype=jnp.float64)
        assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
        check_grads(layer.apply, (params, x), order=1, modes=("fwd", "rev"))


def test_conv_params_have_hwio_layout_and_input_dtype(key):
    # Shapes and dtypes only: jax.eval_shape runs init abstractly, without compiling initializers.
    params = jax.eval_shape(lambda k: jn.Conv2D(6, (3, 2), feature_group_count=2).init(k, (1, 6, 5, 4)), key)
    assert params["w"].shape == (3, 2, 2, 6)
    assert params["b"].shape == (6,)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    with jax.enable_x64(True):
        x = jax.ShapeDtypeStruct((1, 5, 4), jnp.float64)
        params = jax.eval_shape(lambda k: jn.Conv1D(6, 3, use_bias=False).init(k, x), key)
        assert set(params) == {"w"}
        assert (params["w"].shape, params["w"].dtype) == ((3, 4, 6), jnp.float64)


def test_conv_normalises_arguments_so_equal_descriptions_compare_equal():
    a = jn.Conv2D(8, 3, strides=2, padding=1, dilation=1)
    b = jn.Conv2D(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dilation=(1, 1))
    assert a == b and hash(a) == hash(b)
    assert jn.Conv2D(8, 3, padding="same") == jn.Conv2D(8, 3)
    assert jn.Conv2D(8, 3) != jn.Conv2D(8, 3, padding="VALID")


# ---- pooling -----------------------------------------------------------------------------------

POOL_CASES = [
    # (spatial, window, keyword arguments)
    ((6, 6), (2, 2), {}),
    ((7, 5), (2, 2), {}),  # VALID drops the ragged edge
    ((7, 5), (3, 2), dict(strides=(2, 1))),
    ((7, 5), (2, 2), dict(padding="SAME")),
    ((7, 6), (3, 3), dict(strides=(2, 2), padding="SAME")),
    ((6, 7), (2, 3), dict(strides=1, padding="SAME")),
    ((6, 6), (3, 2), dict(strides=(2, 2), padding=((1, 1), (0, 1)))),
    ((9,), (2,), {}),
    ((9,), (3,), dict(strides=2)),
    ((9,), (2,), dict(padding="SAME")),
    ((10,), (4,), dict(strides=3, padding="SAME")),
    ((8,), 3, dict(strides=1, padding=1)),
]


def _pool_setup(case, kind, rng, batch=2, channels=3, dtype=jnp.float32):
    spatial, window, kwargs = case
    layer = (jn.MaxPool if kind == "max" else jn.AvgPool)(window, **kwargs)
    x = jnp.asarray(rng.normal(size=(batch, *spatial, channels)), dtype)
    return layer, x


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}-w{c[1]}-{c[2]}")
def test_pool_matches_numpy_reference(case, kind, rng):
    layer, x = _pool_setup(case, kind, rng)
    y = jax.jit(layer.apply)({}, x)
    expected = pool_reference(x, layer.window_shape, layer.strides, layer.padding, kind)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, **TOL)
    declared = layer.output_shape(x)
    assert (declared.shape, declared.dtype) == (y.shape, y.dtype)
    row, = jn.summarize(layer, x).rows
    assert row.output_shape == y.shape
    assert row.flops == math.prod(y.shape) * math.prod(layer.window_shape)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", [POOL_CASES[i] for i in (4, 10)], ids=lambda c: f"{c[0]}-w{c[1]}-{c[2]}")
def test_pool_jit_vmap_and_one_example_agree(case, kind, rng):
    layer, x = _pool_setup(case, kind, rng, batch=3)
    y = layer.apply({}, x)
    np.testing.assert_allclose(jax.jit(layer.apply)({}, x), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(layer.apply, (None, 0))({}, x), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.apply({}, x[2]), y[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spatial", [(7,), (7, 5)])
@pytest.mark.parametrize("padding", ["SAME", 1])
def test_avg_pool_with_padding_averages_only_real_values(spatial, padding):
    # A constant input keeps its value at every position, edges included; zero padding would
    # pull the edges towards zero.
    layer = jn.AvgPool((3,) * len(spatial), strides=2, padding=padding)
    y = layer.apply({}, jnp.full((2, *spatial, 3), 2.5, jnp.float32))
    np.testing.assert_array_equal(y, np.full(y.shape, 2.5))


def test_max_pool_padding_never_wins(rng):
    x = -jnp.asarray(np.abs(rng.normal(size=(2, 5, 4, 3))) + 1, jnp.float32)  # all negative
    y = jn.MaxPool((2, 2), strides=(2, 2), padding="SAME").apply({}, x)
    assert np.all(np.asarray(y) < 0)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", [POOL_CASES[i] for i in (4, 10)], ids=lambda c: f"{c[0]}-w{c[1]}-{c[2]}")
def test_pool_gradients(case, kind, rng):
    with jax.enable_x64(True):
        layer, x = _pool_setup(case, kind, rng, batch=2, channels=2, dtype=jnp.float64)
        check_grads(lambda v: layer.apply({}, v), (x,), order=1, modes=("fwd", "rev"))


# ---- a small CNN: shapes and FLOPs of the whole stack --------------------------------------------

def test_cnn_output_shape_and_summary_agree_with_actual(key, rng):
    net = jn.serial(jn.Conv2D(4, 3), jn.relu, jn.MaxPool((2, 2)), jn.Conv2D(6, 3, padding="VALID"),
                    jn.AvgPool((2, 2), padding="SAME"), jn.Flatten(), jn.Dense(5))
    x = jnp.asarray(rng.normal(size=(3, 12, 10, 2)), jnp.float32)
    params = _random_params(rng, net, key, x[:1])
    y = jax.jit(net.apply)(params, x)
    assert net.output_shape(x).shape == y.shape == (3, 5)
    summary = jn.summarize(net, x)
    assert [row.path for row in summary.rows] == ["conv_1", "relu_1", "max_pool_1", "conv_2",
                                                   "avg_pool_1", "flatten_1", "dense_1"]
    conv_2 = summary.rows[3]
    assert conv_2.output_shape == (3, 4, 3, 6)
    assert conv_2.flops == 2 * math.prod(conv_2.output_shape) * 9 * 4
    assert summary.parameters == sum(p.size for p in jax.tree.leaves(params))


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: jn.Conv2D(4, 3, padding="FULL"), "Conv2D: unknown padding 'FULL'"),
    (lambda: jn.Conv1D(4, 3, padding=((1, 1), (1, 1))), "Conv1D: padding needs 1 non-negative"),
    (lambda: jn.Conv2D(4, 3, padding=-1), "Conv2D: padding needs 2 non-negative"),
    (lambda: jn.Conv2D(4, 3, padding=(1, 2)), "Conv2D: unknown padding (1, 2); use 'SAME', 'VALID', an int"),
    (lambda: jn.Conv2D(0, 3), "Conv2D: features must be a positive integer, got 0"),
    (lambda: jn.Conv2D(4, (3, 0)), "Conv2D: kernel_size must be a positive integer, got 0"),
    (lambda: jn.Conv1D(4, -2), "Conv1D: kernel_size must be a positive integer, got -2"),
    (lambda: jn.Conv2D(4, 3, strides=0), "Conv2D: strides must be a positive integer, got 0"),
    (lambda: jn.Conv2D(4, 3, strides=(1, 1, 1)), "Conv2D: strides needs 2 entries"),
    (lambda: jn.Conv2D(4, 3, dilation=(1, 0)), "Conv2D: dilation must be a positive integer, got 0"),
    (lambda: jn.Conv2D(4, 3, feature_group_count=0), "feature_group_count must be a positive integer"),
    (lambda: jn.Conv2D(6, 3, feature_group_count=4),
     "Conv2D: features (6) must be divisible by feature_group_count (4)"),
    (lambda: jn.Conv(4, 3), "Conv: kernel_size needs one size per spatial axis"),
    (lambda: jn.Conv2D(4, 3, weight_init="zeros"), "Conv2D: unknown weight_init 'zeros'"),
    (lambda: jn.MaxPool((2, 0)), "MaxPool: window_shape must be a positive integer, got 0"),
    (lambda: jn.AvgPool((2, 2), strides=(0, 1)), "AvgPool: strides must be a positive integer, got 0"),
    (lambda: jn.AvgPool((2, 2), strides=(1, 1, 1)), "AvgPool: strides needs 2 entries"),
    (lambda: jn.MaxPool((2, 2), padding="full"), "MaxPool: unknown padding 'full'"),
])
def test_constructor_errors(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("net, shape, error, message", [
    (jn.Conv2D(4, 5, padding="VALID"), (1, 4, 6, 1), jn.ShapeError,
     r"conv: kernel \(dilated\) \(5, 5\) is larger than the input's spatial shape \(4, 6\)"),
    (jn.Conv2D(4, 3, dilation=3, padding="VALID"), (1, 6, 9, 1), jn.ShapeError,
     r"conv: kernel \(dilated\) \(7, 7\) is larger"),
    (jn.Conv1D(4, 6, padding=1), (1, 3, 1), jn.ShapeError,
     r"conv: kernel \(dilated\) \(6,\) is larger than the input's spatial shape \(3,\) padded by"),
    (jn.MaxPool((3, 3)), (1, 2, 5, 1), jn.ShapeError,
     r"max_pool: window \(3, 3\) is larger than the input's spatial shape \(2, 5\)"),
    (jn.AvgPool((4,)), (1, 3, 2), jn.ShapeError, r"avg_pool: window \(4,\) is larger"),
    (jn.Conv2D(4, 3, feature_group_count=2), (1, 5, 5, 3), jn.ShapeError,
     r"conv: input channels \(3\) must be divisible by feature_group_count \(2\)"),
    (jn.serial(jn.Conv2D(4, 3)), (1, 28, 28), jn.ShapeError,
     r"conv_1: expected examples of shape \(height, width, channels\) \(rank 3\); "
     r"got examples of shape \(28, 28\) \(rank 2\)"),
    (jn.serial(jn.Conv1D(4, 3)), (1, 5, 5, 2), jn.ShapeError,
     r"conv_1: expected examples of shape \(length, channels\) \(rank 2\)"),
    (jn.serial(jn.Dense(3), jn.MaxPool((2, 2))), (1, 4, 4), jn.ShapeError,
     r"max_pool_1: expected examples of shape \(height, width, channels\)"),
    (jn.AvgPool(2), (1, 4, 4, 1), jn.ShapeError,
     r"avg_pool: expected examples of shape \(length, channels\) \(rank 2\)"),
])
def test_init_errors(net, shape, error, message, key):
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda k: net.init(k, shape), key)  # raised while tracing, as in a real init


@pytest.mark.parametrize("net, name, shape", [
    (jn.Conv2D(4, 3), "conv", (2, 6, 6, 3)),
    (jn.serial(jn.Conv1D(4, 3)), "conv_1", (2, 6, 3)),
    (jn.MaxPool((2, 2)), "max_pool", (2, 6, 6, 3)),
    (jn.serial(jn.AvgPool((2,))), "avg_pool_1", (2, 6, 3)),
])
def test_integer_input_is_a_type_error(net, name, shape, key, rng):
    x = jnp.ones(shape, jnp.int32)
    with pytest.raises(TypeError, match=f"{name}: expected a floating-point input, got int32"):
        net.init(key, x)
    params = _random_params(rng, net, key, x.astype(jnp.float32))
    with pytest.raises(TypeError, match=f"{name}: expected a floating-point input, got int32"):
        net.apply(params, x)


def test_apply_with_a_missing_channel_axis_names_the_layout(key, rng):
    net = jn.serial(jn.Conv2D(4, 3), jn.Flatten(), jn.Dense(2))
    params = _random_params(rng, net, key, (1, 8, 8, 1))
    with pytest.raises(jn.ShapeError, match=r"conv_1: expected examples of shape \(height, width, channels\)"):
        net.apply(params, jnp.asarray(rng.normal(size=(8, 8)), jnp.float32))


@pytest.mark.parametrize("pool", [jn.MaxPool, jn.AvgPool])
def test_pool_padding_as_wide_as_the_window_is_rejected(pool, key):
    layer = pool((2,), padding=((2, 0),))
    with pytest.raises(jn.ShapeError, match=r"padding \(\(2, 0\),\) is as wide as the window \(2,\)"):
        layer.init(key, (1, 4, 1))


def test_numpy_integer_sizes_are_accepted(key):
    layer = jn.Conv2D(np.int64(3), np.int64(2))
    assert jax.tree.map(jnp.shape, layer.init(key, (1, 5, 5, 1)))["w"] == (2, 2, 1, 3)


# ---- the fast CPU formulations equal the straightforward lax ones (values and gradients) -------

from jaxnet._xla import conv_ops as _conv_ops  # noqa: E402


@pytest.mark.parametrize("spatial, kernel, strides, dilation, padding", [
    ((9, 9), (3, 3), (1, 1), (1, 1), "SAME"),
    ((10, 7), (3, 2), (2, 1), (1, 2), "VALID"),
    ((11, 8), (3, 3), (2, 3), (2, 1), ((2, 0), (1, 3))),
    ((12,), (4,), (3,), (1,), "SAME"),
    ((7, 7), (1, 1), (2, 2), (1, 1), ((3, 3), (0, 0))),
    ((9,), (3,), (2,), (2,), ((0, 1),)),
    ((6, 5, 4), (2, 3, 2), (1, 2, 1), (1, 1, 2), "SAME"),
])
@pytest.mark.parametrize("per_chunk", [None, 1, 2])
def test_canonical_conv_gradients_equal_lax(rng, monkeypatch, spatial, kernel, strides, dilation,
                                            padding, per_chunk):
    """per_chunk: examples per chunk of the kernel gradient on CPU (None: the whole batch of 5;
    2: chunks of 2, 2 and 1)."""
    x = jnp.asarray(rng.normal(size=(5, *spatial, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 4, 5)), jnp.float32)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    pads = tuple(map(tuple, jax.lax.padtype_to_pads(spatial, dilated, strides, padding))) \
        if isinstance(padding, str) else padding
    numbers = _conv_ops.dimension_numbers(len(kernel))

    def reference(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                            dimension_numbers=numbers)

    fast = lambda x, w: _conv_ops.conv(x, w, strides, pads, dilation)
    positions = math.prod(jax.eval_shape(fast, x, w).shape[1:-1])
    monkeypatch.setattr(_conv_ops, "CHUNK_POSITIONS", 10 ** 6 if per_chunk is None else per_chunk * positions)
    y, pullback = jax.vjp(fast, x, w)
    y_ref, pullback_ref = jax.vjp(reference, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, want in zip(pullback(g), pullback_ref(g)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, per_example, budget, sizes", [
    (128, 196, 2048, [10] * 12 + [8]),   # ~2048 positions per chunk
    (128, 784, 2048, [8] * 16),          # at most MAX_CHUNKS chunks
    (5, 10 ** 6, 2048, [1] * 5),         # at least one example per chunk
    (3, 1, 2048, [3]),                   # a small batch is one chunk
])
def test_example_chunks(n, per_example, budget, sizes):
    chunks = _conv_ops.example_chunks(n, per_example, budget)
    assert [c.stop - c.start for c in chunks] == sizes
    assert chunks[0].start == 0 and chunks[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))


def test_canonical_conv_gradients_in_float64(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)))
        w = jnp.asarray(rng.normal(size=(3, 2, 3, 2)))
        check_grads(lambda x, w: _conv_ops.conv(x, w, (2, 1), ((1, 1), (0, 1)), (1, 2)), (x, w),
                    order=2, modes=["rev"])


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("values", ["normal", "ties"])
@pytest.mark.parametrize("window, spatial, padding", [
    ((2, 2), (6, 6), "VALID"), ((3, 1), (7, 5), "VALID"), ((2,), (7,), ((0, 0),)),
    ((2, 2, 2), (4, 5, 4), "VALID")])
def test_tiling_pools_equal_reduce_window(rng, kind, values, window, spatial, padding):
    """Windows that tile the input take the reshape path; values, gradients and forward-mode
    derivatives equal ``reduce_window``'s exactly, ties included (small integers tie often;
    odd sizes: VALID drops the remainder in both)."""
    pool = (jn.MaxPool if kind == "max" else jn.AvgPool)(window, padding=padding)
    shape = (2, *spatial, 3)
    x = jnp.asarray(rng.normal(size=shape) if values == "normal" else rng.integers(-2, 3, shape),
                    jnp.float32)
    assert pool._blocks(x, True) is not None
    assert pool._blocks(x, False) is None  # evaluation mode keeps reduce_window

    def reference(x):
        dims = (1,) + window + (1,)
        if kind == "max":
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims, "VALID")
        return jax.lax.reduce_window(x, np.float32(0), jax.lax.add, dims, dims, "VALID") / math.prod(window)

    fast = lambda x: pool.apply({}, x, train=True)
    for transform in (lambda f: f, jax.jit):
        y, pullback = jax.vjp(transform(fast), x)
        y_ref, pullback_ref = jax.vjp(reference, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6)
        g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        np.testing.assert_allclose(pullback(g)[0], pullback_ref(g)[0], rtol=1e-6)
        t = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
        np.testing.assert_allclose(jax.jvp(transform(fast), (x,), (t,))[1],
                                   jax.jvp(reference, (x,), (t,))[1], rtol=1e-6)


@pytest.mark.parametrize("pool", [jn.MaxPool((2, 2), strides=1), jn.MaxPool((2, 2), padding="SAME"),
                                  jn.AvgPool((3, 3), strides=2)])
def test_overlapping_or_padded_pools_keep_reduce_window(pool, rng):
    assert pool._blocks(jnp.asarray(rng.normal(size=(1, 6, 6, 2)), jnp.float32),
                        True) is None


@pytest.mark.parametrize("train", [True, False])
def test_max_pool_gradient_goes_to_the_first_tied_maximum(train):
    """In training (reshape) and evaluation (reduce_window) mode alike."""
    x = jnp.asarray([1.0, 3.0, 3.0, 2.0]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: jn.MaxPool((2, 2)).apply({}, x, train=train).sum())(x)
    np.testing.assert_array_equal(grad.ravel(), [0.0, 1.0, 0.0, 0.0])



def _max_reduction_drops_nan() -> bool:
    """Whether this XLA's max reduction skips NaN at a size it hands to a library (YNNPACK)."""
    x = np.ones((4000, 3), np.float32)
    x[:, 0] = np.nan
    return not np.isnan(np.asarray(jax.jit(lambda v: jnp.max(v, -1))(x))).all()


NAN_DROPPED = pytest.mark.xfail(_max_reduction_drops_nan(), strict=True,
                                reason="known: XLA:CPU's max reductions drop NaN (docs/performance.md, "
                                       "finding 22); MaxPool does not correct it yet")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("pool", [pytest.param(jn.MaxPool((2, 2)), marks=NAN_DROPPED),
                                  jn.MaxPool((3, 3), strides=2, padding="SAME")],
                         ids=["tiling", "padded"])
def test_max_pool_keeps_nan_as_reduce_window_defines_it(pool, train, rng):
    """A window holding a NaN gives NaN, in training and evaluation mode, eagerly and in jaxnet's
    programs. Windows that tile the input do not yet: XLA:CPU's max reductions (reduce_window's
    too) drop NaN at these sizes."""
    x = rng.normal(size=(256, 14, 14, 8)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan
    # the float64 reference: a NaN-aware window sum marks each window holding a NaN
    nan_windows = np.asarray(pool._reduce(jnp.asarray(np.isnan(x), jnp.float32), np.float32(0),
                                          jax.lax.add)) > 0
    reference = pool.apply({}, jnp.asarray(np.nan_to_num(x, nan=-1e30)), train=False)
    expected = np.where(nan_windows, np.nan, np.asarray(reference))
    assert nan_windows.any() and not nan_windows.all()
    for apply in (pool.apply, xla_options.jit(pool.apply, static_argnames="train", forward_rows=256)):
        np.testing.assert_array_equal(apply({}, jnp.asarray(x), train=train), expected)


def test_window_max_gradient_goes_to_the_first_nan():
    blocks = jnp.asarray([[1.0, jnp.nan], [jnp.nan, 2.0]]).reshape(1, 1, 2, 1, 2, 1)
    y, pullback = jax.vjp(_conv_ops.window_max, blocks)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(pullback(jnp.ones_like(y))[0].ravel(), [0.0, 1.0, 0.0, 0.0])


def test_window_max_second_derivatives(rng):
    blocks = jnp.asarray(rng.normal(size=(2, 3, 2, 2, 2, 3)))
    check_grads(_conv_ops.window_max, (blocks,), order=2, modes=["fwd", "rev"])


def test_cnn_gradient_step_inside_scan_matches_per_step(key, rng):
    """The reverse-only path (canonical conv gradients, transposed Dense weight gradients) inside a
    scan equals plain lax gradients."""
    net = jn.serial(jn.Conv2D(4, 3), jn.relu, jn.MaxPool((2, 2)), jn.Flatten(), jn.Dense(3))
    x = jnp.asarray(rng.normal(size=(3, 4, 8, 8, 1)), jnp.float32)
    params = net.init(key, x[0, :1])
    fast = lambda p, xb: net.apply_with_state(p, {}, xb, reverse_only=True)[0]
    grad = jax.grad(lambda p, xb: jnp.sum(fast(p, xb) ** 2))
    lax_grad = jax.grad(lambda p, xb: jnp.sum(net.apply(p, xb) ** 2))
    per_step = [jax.jit(lax_grad)(params, xb) for xb in x]
    scanned = jax.jit(lambda p, xs: jax.lax.scan(lambda c, xb: (c, grad(p, xb)), 0, xs)[1])(params, x)
    for i, g in enumerate(per_step):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jax.tree.map(lambda t: t[i], scanned))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
