"""ConvTranspose and Upsample against NumPy float64 references and PyTorch, plus transforms and errors."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, random_params

TOL = dict(rtol=1e-5, atol=1e-5)


# ---- independent NumPy references (float64) ----------------------------------------------------

def conv_transpose_reference(x, w, b, strides, crops):
    """Scatter-add: input position i adds x[i] @ w[k] at output i * stride + k; then each axis
    loses crops[axis] = (low, high) positions at its ends (a negative high adds zeros there)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, *spatial, _ = x.shape
    *kernel, _, features = w.shape
    full = [(size - 1) * s + k for size, s, k in zip(spatial, strides, kernel)]
    y = np.zeros((n, *full, features))
    for index in itertools.product(*map(range, spatial)):
        for k_index in itertools.product(*map(range, kernel)):
            out = tuple(i * s + k for i, s, k in zip(index, strides, k_index))
            y[(slice(None),) + out] += x[(slice(None),) + index] @ w[k_index]
    for axis, (lo, hi) in enumerate(crops, start=1):
        if hi < 0:
            extra = list(y.shape)
            extra[axis] = -hi
            y = np.concatenate([y, np.zeros(extra)], axis=axis)
            hi = 0
        y = np.take(y, np.arange(lo, y.shape[axis] - hi), axis=axis)
    return y if b is None else y + np.asarray(b, np.float64)


def linear_resize_reference(x, scales):
    """Half-pixel linear interpolation along each spatial axis, source coordinates clamped to the
    input (torch's align_corners=False)."""
    y = np.asarray(x, np.float64)
    for axis, s in enumerate(scales, start=1):
        n = y.shape[axis]
        source = np.clip((np.arange(n * s) + 0.5) / s - 0.5, 0, n - 1)
        lo = np.floor(source).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1] * y.ndim
        shape[axis] = n * s
        frac = (source - lo).reshape(shape)
        y = np.take(y, lo, axis=axis) * (1 - frac) + np.take(y, hi, axis=axis) * frac
    return y


def test_references_agree_with_hand_computed_values():
    # x = [1, 2], w = [1, 10], stride 2: [1, 10, 2, 20]; stride 1: [1, 12, 20].
    x = np.array([1.0, 2.0]).reshape(1, 2, 1)
    w = np.array([1.0, 10.0]).reshape(2, 1, 1)
    np.testing.assert_array_equal(conv_transpose_reference(x, w, None, (2,), [(0, 0)]).ravel(), [1, 10, 2, 20])
    np.testing.assert_array_equal(conv_transpose_reference(x, w, None, (1,), [(1, 0)]).ravel(), [12, 20])
    np.testing.assert_array_equal(conv_transpose_reference(x, w, None, (3,), [(0, -1)]).ravel(), [1, 10, 0, 2, 20, 0])
    np.testing.assert_allclose(linear_resize_reference(x, (2,)).ravel(), [1, 1.25, 1.75, 2])


# ---- ConvTranspose -------------------------------------------------------------------------------

CASES = [
    # (spatial, in_channels, features, kernel, keyword arguments, crops (low, high) per axis)
    ((4, 3), 3, 2, 3, dict(padding="VALID"), [(0, 0), (0, 0)]),
    ((4, 3), 2, 3, 3, dict(strides=2, padding="VALID"), [(0, 0), (0, 0)]),
    ((4, 3), 2, 3, 4, dict(strides=2), [(1, 1), (1, 1)]),  # SAME: out = in * stride
    ((4, 3), 2, 3, 3, dict(strides=2), [(0, 1), (0, 1)]),  # SAME, odd overlap cropped at the end
    ((4, 3), 2, 3, 3, {}, [(1, 1), (1, 1)]),
    ((3, 4), 2, 2, 2, dict(strides=3), [(0, -1), (0, -1)]),  # SAME, kernel < stride: a bias-only row
    ((3, 4), 2, 2, 2, dict(strides=3, padding="VALID"), [(0, 0), (0, 0)]),
    ((4, 3), 3, 2, 3, dict(strides=2, padding=((1, 0), (1, 0))), [(1, 0), (1, 0)]),
    ((4, 3), 2, 3, (3, 2), dict(strides=(2, 1), padding=((1, 1), (0, 0))), [(1, 1), (0, 0)]),
    ((3, 3), 2, 2, (5, 3), dict(strides=(2, 3), padding=((2, 1), (1, 1))), [(2, 1), (1, 1)]),
    ((4, 3), 2, 3, 3, dict(strides=2, padding=1, use_bias=False), [(1, 1), (1, 1)]),
    ((5,), 3, 4, 3, dict(strides=2, padding=1), [(1, 1)]),
    ((5,), 3, 4, 4, dict(strides=2), [(1, 1)]),
    ((5,), 2, 3, 5, dict(strides=3, padding=((2, 0),)), [(2, 0)]),
    ((5,), 2, 3, 1, dict(strides=2, padding="VALID"), [(0, 0)]),
    ((3, 2, 3), 2, 2, (2, 3, 2), dict(strides=(2, 1, 2)), [(0, 0), (1, 1), (0, 0)]),
]
IDS = [f"{c[0]}-k{c[3]}-{c[4]}" for c in CASES]


def _setup(case, key, rng, batch=2, dtype=jnp.float32):
    spatial, channels, features, kernel, kwargs, _ = case
    layer = jn.ConvTranspose(features, (kernel,) * len(spatial) if isinstance(kernel, int) else kernel, **kwargs)
    x = jnp.asarray(rng.normal(size=(batch, *spatial, channels)), dtype)
    return layer, random_params(layer, x[:1], rng), x


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_transpose_matches_the_numpy_scatter_add_reference(case, key, rng):
    layer, params, x = _setup(case, key, rng)
    y = jax.jit(layer.apply)(params, x)
    expected = conv_transpose_reference(x, params["w"], params.get("b"), layer.strides, case[5])
    assert (y.shape, y.dtype) == (expected.shape, jnp.float32)
    np.testing.assert_allclose(y, expected, **TOL)
    assert layer.output_shape(x).shape == y.shape


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_transpose_is_the_adjoint_of_conv_with_the_same_arguments(case, key, rng):
    # <ConvTranspose(x), g> = <x, Conv(g)>: the transpose of Conv on inputs of the output's shape.
    layer, params, x = _setup(case, key, rng)
    y = layer.apply({"w": params["w"]} if not layer.use_bias else {**params, "b": params["b"] * 0}, x)
    conv = jn.Conv(x.shape[-1], layer.kernel_size, strides=layer.strides, padding=layer.padding, use_bias=False)
    conv_w = jnp.swapaxes(params["w"], -1, -2)
    _, vjp = jax.vjp(lambda v: conv.apply({"w": conv_w}, v), jnp.zeros(y.shape, y.dtype))
    np.testing.assert_allclose(vjp(x)[0], y, **TOL)


@pytest.mark.parametrize("kernel, strides", [(3, 2), (4, 2), (2, 3), ((5, 1), (3, 1)), (3, 1)])
def test_same_conv_transpose_equals_lax_conv_transpose_same(kernel, strides, key, rng):
    layer = jn.ConvTranspose2D(3, kernel, strides=strides, use_bias=False)
    x = jnp.asarray(rng.normal(size=(2, 4, 5, 2)), jnp.float32)
    w = random_params(layer, x[:1], rng)["w"]
    expected = jax.lax.conv_transpose(x, jnp.swapaxes(w, -1, -2), layer.strides, "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
    np.testing.assert_allclose(layer.apply({"w": w}, x), expected, **TOL)


TORCH_CASES = [
    # (spatial, in_channels, features, kernel, strides, jaxnet padding, torch padding, output_padding)
    ((4, 3), 3, 2, (3, 3), (1, 1), "VALID", (0, 0), (0, 0)),
    ((4, 3), 2, 3, (3, 3), (2, 2), "VALID", (0, 0), (0, 0)),
    ((4, 3), 2, 3, (4, 4), (2, 2), "SAME", (1, 1), (0, 0)),
    ((4, 3), 2, 3, (3, 3), (1, 1), "SAME", (1, 1), (0, 0)),
    ((3, 4), 2, 2, (2, 2), (3, 3), "VALID", (0, 0), (0, 0)),
    ((4, 3), 3, 2, (3, 3), (2, 2), 1, (1, 1), (0, 0)),
    ((4, 3), 3, 2, (3, 3), (2, 2), ((1, 0), (1, 0)), (1, 1), (1, 1)),  # the usual x2 decoder step
    ((3, 3), 2, 2, (5, 3), (2, 3), ((2, 1), (1, 1)), (2, 1), (1, 0)),
    ((5,), 3, 4, (3,), (2,), 1, (1,), (0,)),
    ((5,), 3, 4, (4,), (2,), "SAME", (1,), (0,)),
    ((5,), 2, 3, (5,), (3,), ((2, 0),), (2,), (2,)),
    ((6,), 2, 3, (2,), (2,), "VALID", (0,), (0,)),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[f"{c[0]}-k{c[3]}-s{c[4]}-{c[5]}" for c in TORCH_CASES])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_transpose_matches_torch_with_the_same_weights(case, use_bias, rng):
    torch = pytest.importorskip("torch")
    spatial, channels, features, kernel, strides, padding, torch_padding, output_padding = case
    layer = jn.ConvTranspose(features, kernel, strides=strides, padding=padding, use_bias=use_bias)
    x = jnp.asarray(rng.normal(size=(2, *spatial, channels)), jnp.float32)
    params = random_params(layer, x[:1], rng)
    torch_layer = (torch.nn.ConvTranspose1d if len(spatial) == 1 else torch.nn.ConvTranspose2d)(
        channels, features, kernel, stride=strides, padding=torch_padding, output_padding=output_padding,
        bias=use_bias)
    ndim = len(spatial)
    # to_torch's weight is torch's (in, out, *kernel), ours (*kernel, in, out) moved: no spatial flip
    torch_layer.load_state_dict(jn.to_torch(layer, params, example=x[:1]).state_dict())
    with torch.no_grad():
        expected = torch_layer(torch.tensor(np.moveaxis(np.asarray(x), -1, 1))).numpy()
    y = layer.apply(params, x)
    np.testing.assert_allclose(y, np.moveaxis(expected, 1, -1), **TOL)
    assert y.shape[1:1 + ndim] == layer.output_spatial(spatial)


@pytest.mark.parametrize("case", [CASES[i] for i in (3, 9, 13, 15)], ids=[IDS[i] for i in (3, 9, 13, 15)])
def test_conv_transpose_contract_jit_vmap_and_one_example(case, key, rng):
    layer, params, x = _setup(case, key, rng, batch=6)
    assert layer.example_ndim == len(layer.kernel_size) + 1
    assert_contract(layer, params, x)


@pytest.mark.parametrize("case", [CASES[i] for i in (3, 5, 13)], ids=[IDS[i] for i in (3, 5, 13)])
def test_conv_transpose_gradients(case, key, rng):
    with jax.enable_x64(True):
        layer, params, x = _setup(case, key, rng, batch=2, dtype=jnp.float64)
        check_grads(layer.apply, (params, x), order=2, modes=("rev",))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_transpose_flops_count_every_product_once(case, key, rng):
    layer, _, x = _setup(case, key, rng)
    spatial, channels, features, _, kwargs, _ = case
    y_shape = layer.output_shape(x).shape
    row, = jn.summarize(layer, x).rows
    bias = math.prod(y_shape) if kwargs.get("use_bias", True) else 0
    assert row.flops == 2 * math.prod(x.shape) * math.prod(layer.kernel_size) * features + bias


def test_conv_transpose_params_are_kernel_in_out_in_the_input_dtype(key):
    params = jax.eval_shape(lambda k: jn.ConvTranspose2D(6, (3, 2)).init(k, (1, 5, 4, 3)), key)
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == {
        "w": ((3, 2, 3, 6), jnp.float32), "b": ((6,), jnp.float32)}
    with jax.enable_x64(True):
        x = jax.ShapeDtypeStruct((1, 5, 4), jnp.float64)
        params = jax.eval_shape(lambda k: jn.ConvTranspose1D(2, 3, use_bias=False).init(k, x), key)
        assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == {"w": ((3, 4, 2), jnp.float64)}


def test_pytorch_init_uses_torchs_fan_in_of_output_channels(key):
    params = jn.ConvTranspose2D(8, 3, weight_init="pytorch").init(key, (1, 4, 4, 2))
    bound = 1 / math.sqrt(8 * 9)  # torch counts out_channels * kernel, not in_channels
    for p in (params["w"], params["b"]):
        assert np.all(np.abs(p) <= bound)
    assert np.abs(params["w"]).max() > 0.9 * bound and np.abs(params["b"]).max() > 0


def test_a_same_transpose_restores_the_shape_a_strided_conv_halved(key, rng):
    net = jn.serial(jn.Conv2D(4, 3, strides=2), jn.relu, jn.ConvTranspose2D(3, 4, strides=2))
    x = jnp.asarray(rng.normal(size=(6, 8, 6, 3)), jnp.float32)
    y = assert_contract(net, random_params(net, x[:1], rng), x)
    assert y.shape == x.shape


def test_conv_transpose_normalises_arguments_so_equal_descriptions_compare_equal():
    assert jn.ConvTranspose2D(4, 3, strides=2, padding=1) == jn.ConvTranspose(
        4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    assert jn.ConvTranspose2D(4, 3, padding="same") == jn.ConvTranspose2D(4, 3)
    assert repr(jn.ConvTranspose1D(4, 3, strides=2)) == "ConvTranspose(4, (3,), strides=(2,))"


# ---- Upsample ------------------------------------------------------------------------------------

UPSAMPLE_CASES = [((5,), 2), ((5,), (3,)), ((3, 4), 2), ((3, 4), (2, 3)), ((3, 4), (1, 2)),
                  ((2, 3, 2), (2, 1, 3)), ((3, 4), 1)]
UPSAMPLE_IDS = [f"{s}-x{scale}" for s, scale in UPSAMPLE_CASES]


def _scales(spatial, scale):
    return (scale,) * len(spatial) if isinstance(scale, int) else scale


@pytest.mark.parametrize("spatial, scale", UPSAMPLE_CASES, ids=UPSAMPLE_IDS)
def test_nearest_upsampling_repeats_each_value(spatial, scale, rng):
    x = jnp.asarray(rng.normal(size=(2, *spatial, 3)), jnp.float32)
    y = jax.jit(jn.Upsample(scale).apply)({}, x)
    expected = np.asarray(x)
    for axis, s in enumerate(_scales(spatial, scale), start=1):
        expected = np.repeat(expected, s, axis=axis)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, expected)


def test_nearest_upsampling_keeps_integer_inputs_integer():
    x = jnp.arange(12, dtype=jnp.int32).reshape(1, 2, 2, 3)
    y = jn.Upsample((2, 2)).apply({}, x)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y, np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))


@pytest.mark.parametrize("spatial, scale", UPSAMPLE_CASES, ids=UPSAMPLE_IDS)
def test_bilinear_upsampling_matches_the_numpy_reference(spatial, scale, rng):
    x = jnp.asarray(rng.normal(size=(2, *spatial, 3)), jnp.float32)
    y = jax.jit(jn.Upsample(scale, "bilinear").apply)({}, x)
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y, linear_resize_reference(x, _scales(spatial, scale)), **TOL)


@pytest.mark.parametrize("spatial, scale", UPSAMPLE_CASES, ids=UPSAMPLE_IDS)
@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_upsampling_matches_torch_interpolate(spatial, scale, method, rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(2, *spatial, 3)).astype(np.float32)
    scales = _scales(spatial, scale)
    mode = method if method == "nearest" else {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    expected = torch.nn.functional.interpolate(
        torch.tensor(np.moveaxis(x, -1, 1)), scale_factor=tuple(float(s) for s in scales), mode=mode,
        **({} if method == "nearest" else dict(align_corners=False))).numpy()
    np.testing.assert_allclose(jn.Upsample(scale, method).apply({}, x), np.moveaxis(expected, 1, -1), **TOL)


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
@pytest.mark.parametrize("scale", [(2, 3), (1, 2, 2)])
def test_upsample_contract_jit_vmap_and_one_example(scale, method, rng):
    layer = jn.Upsample(scale, method)
    assert layer.example_ndim == len(scale) + 1
    x = jnp.asarray(rng.normal(size=(6, *range(3, 3 + len(scale)), 2)), jnp.float32)
    assert_contract(layer, {}, x)


def test_an_integer_scale_takes_its_rank_from_the_layers_before(rng):
    net = jn.serial(jn.Conv2D(3, 3), jn.Upsample(2, "bilinear"), jn.Conv2D(2, 3))
    assert jn.Upsample(2).example_ndim is None
    x = jnp.asarray(rng.normal(size=(6, 4, 3, 2)), jnp.float32)
    assert assert_contract(net, random_params(net, x[:1], rng), x).shape == (6, 8, 6, 2)


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_upsample_gradients(method, rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 2, 2)), jnp.float64)
        check_grads(lambda v: jn.Upsample((2, 3), method).apply({}, v), (x,), order=2, modes=("rev",))


def test_nearest_upsampling_gradient_sums_each_block():
    x = jnp.ones((1, 2, 2, 1), jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(jn.Upsample((2, 3)).apply({}, v)))(x)
    np.testing.assert_array_equal(grad, np.full(x.shape, 6.0))


@pytest.mark.parametrize("method, per_output", [("nearest", 0), ("bilinear", 2 * 4)])
def test_upsample_flops(method, per_output, rng):
    x = jnp.zeros((2, 3, 4, 5), jnp.float32)
    row, = jn.summarize(jn.Upsample(2, method), x).rows
    assert row.output_shape == (2, 6, 8, 5)
    assert row.flops == 2 * 6 * 8 * 5 * per_output


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: jn.ConvTranspose(4, 3), "ConvTranspose: kernel_size needs one size per spatial axis"),
    (lambda: jn.ConvTranspose2D(0, 3), "ConvTranspose2D: features must be a positive integer, got 0"),
    (lambda: jn.ConvTranspose2D(4, (3, 0)), "ConvTranspose2D: kernel_size must be a positive integer, got 0"),
    (lambda: jn.ConvTranspose(4, (3, 3, 3, 3)), "ConvTranspose4D: kernel_size needs 1 to 3 spatial sizes"),
    (lambda: jn.ConvTranspose1D(4, 3, strides=0), "ConvTranspose1D: strides must be a positive integer, got 0"),
    (lambda: jn.ConvTranspose2D(4, 3, strides=(2, 2, 2)), "ConvTranspose2D: strides needs 2 entries"),
    (lambda: jn.ConvTranspose2D(4, 3, padding="FULL"), "ConvTranspose2D: unknown padding 'FULL'"),
    (lambda: jn.ConvTranspose1D(4, 3, padding=((1, -1),)), "ConvTranspose1D: padding needs 1 non-negative"),
    (lambda: jn.ConvTranspose2D(4, 3, weight_init="zeros"), "ConvTranspose2D: unknown weight_init 'zeros'"),
    (lambda: jn.Upsample(0), "Upsample: scale must be a positive integer, got 0"),
    (lambda: jn.Upsample((2, 0)), "Upsample: scale must be a positive integer, got 0"),
    (lambda: jn.Upsample(2.0), "Upsample: scale must be a positive integer or one per spatial axis, got 2.0"),
    (lambda: jn.Upsample(()), "Upsample: scale must be a positive integer or one per spatial axis, got ()"),
    (lambda: jn.Upsample(2, "cubic"), "Upsample: unknown method 'cubic'; use 'nearest' or 'bilinear'"),
])
def test_constructor_errors(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("net, shape, error, message", [
    (jn.ConvTranspose2D(4, 3), (1, 28, 28), jn.ShapeError,
     r"conv_transpose: expected examples of shape \(height, width, channels\) \(rank 3\); "
     r"got examples of shape \(28, 28\) \(rank 2\)"),
    (jn.serial(jn.ConvTranspose1D(4, 3)), (1, 5, 5, 2), jn.ShapeError,
     r"conv_transpose_1: expected examples of shape \(length, channels\) \(rank 2\)"),
    (jn.ConvTranspose1D(4, 3, padding=((2, 2),)), (1, 1, 2), jn.ShapeError,
     r"conv_transpose: padding \(\(2, 2\),\) crops the whole output: inputs of spatial shape \(1,\) "
     r"give an output of spatial shape \(-1,\)"),
    (jn.ConvTranspose2D(4, 3), (1, 4, 4, 2), None, None),
    (jn.Upsample((2, 2)), (1, 4, 4), jn.ShapeError,
     r"upsample: expected examples of shape \(height, width, channels\) \(rank 3\)"),
    (jn.Upsample((2, 2, 2, 2)), (1, 4, 4, 2), jn.ShapeError,
     r"upsample: expected examples of shape \(\*spatial, channels\) \(rank 5\)"),
    (jn.Upsample(2), (3, 4), jn.ShapeError,
     r"upsample: expected examples of shape \(\*spatial, channels\) with at least one spatial axis; "
     r"got examples of shape \(4,\) \(rank 1\)"),
])
def test_init_errors(net, shape, error, message, key):
    if error is None:  # the valid input of the same layer
        jax.eval_shape(lambda k: net.init(k, shape), key)
        return
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda k: net.init(k, shape), key)


@pytest.mark.parametrize("net, name", [(jn.ConvTranspose2D(4, 3), "conv_transpose"),
                                       (jn.Upsample((2, 2), "bilinear"), "upsample")])
def test_integer_input_is_a_type_error(net, name, key):
    with pytest.raises(TypeError, match=f"{name}: expected a floating-point input, got int32"):
        net.init(key, jnp.ones((1, 4, 4, 2), jnp.int32))
