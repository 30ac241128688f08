"""RMSNorm and GroupNorm against NumPy float64 references, torch.nn.RMSNorm and torch.nn.GroupNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64, random_params
from jaxnet.nn.layer import ShapeError

RTOL, ATOL = 1e-5, 1e-5


def normal(rng, shape, dtype=jnp.float32, loc=0.0, scale=1.0):
    return jnp.asarray(rng.normal(loc, scale, size=shape), dtype)


def rms_norm_reference(x, scale, epsilon):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + epsilon)
    return y if scale is None else y * np.asarray(scale, np.float64)


def group_norm_reference(x, groups, params, epsilon):
    """Per example and group: statistics over the spatial axes and the group's channels."""
    x = np.asarray(x, np.float64)
    channels = x.shape[-1]
    size = channels // groups
    y = np.empty_like(x)
    for b in range(x.shape[0]):
        for g in range(groups):
            part = x[b, ..., g * size:(g + 1) * size]
            y[b, ..., g * size:(g + 1) * size] = (part - part.mean()) / np.sqrt(part.var() + epsilon)
    p = f64(params)
    return y * p.get("scale", 1.0) + p.get("bias", 0.0)


# ---- RMSNorm ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, use_scale", [((6, 5), True), ((6, 3, 7), False), ((6, 2, 2, 1), True)])
def test_rms_norm_matches_numpy(rng, shape, use_scale):
    net = jn.RMSNorm(use_scale=use_scale)
    x = normal(rng, shape, loc=0.5, scale=3.0)
    params = random_params(net, x[:1], rng)
    assert jax.tree.map(jnp.shape, params) == ({"scale": (shape[-1],)} if use_scale else {})
    y = assert_contract(net, params, x)
    np.testing.assert_allclose(y, rms_norm_reference(x, params.get("scale"), 1e-6), rtol=RTOL, atol=ATOL)


def test_rms_norm_matches_torch(rng):
    torch = pytest.importorskip("torch")
    module = torch.nn.RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(rng.normal(size=6), dtype=torch.float32))
    x = rng.normal(size=(4, 3, 6)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.tensor(x)).numpy()
    y = jn.RMSNorm(1e-5).apply({"scale": jnp.asarray(module.weight.detach().numpy())}, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_starts_as_the_plain_normalisation(rng):
    x = normal(rng, (3, 4))
    net = jn.RMSNorm()
    params = net.init(jax.random.key(0), x)
    np.testing.assert_array_equal(params["scale"], 1.0)
    np.testing.assert_allclose(net.apply(params, x), rms_norm_reference(x, None, 1e-6), rtol=RTOL, atol=ATOL)


def test_rms_norm_computes_bfloat16_statistics_in_float32(rng):
    x = normal(rng, (4, 64), loc=100.0)  # mean squares far beyond bfloat16's 8 significant bits
    x16 = x.astype(jnp.bfloat16)
    net = jn.RMSNorm()
    params = net.init(jax.random.key(0), x16)
    y = net.apply(params, x16)
    assert y.dtype == jnp.bfloat16 and params["scale"].dtype == jnp.bfloat16
    expected = rms_norm_reference(np.asarray(x16, np.float64), None, 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-2)


def test_rms_norm_gradients_match_finite_differences(rng):
    net = jn.RMSNorm()
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 5)))
        params = jax.tree.map(lambda a: a * 1.5, net.init(jax.random.key(0), x))
        check_grads(net.apply, (params, x), order=2, modes=("rev",))


# ---- GroupNorm ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups", [((6, 4), 2), ((6, 5, 6), 3), ((6, 3, 4, 8), 4),
                                           ((6, 3, 4, 8), 1), ((6, 3, 4, 8), 8)])
def test_group_norm_matches_numpy(rng, shape, groups):
    net = jn.GroupNorm(groups)
    x = normal(rng, shape, loc=1.0, scale=2.0)
    params = random_params(net, x[:1], rng)
    assert jax.tree.map(jnp.shape, params) == {"scale": (shape[-1],), "bias": (shape[-1],)}
    y = net.apply(params, x, batch_ndim=1)
    np.testing.assert_allclose(y, group_norm_reference(x, groups, params, 1e-5), rtol=1e-4, atol=1e-4)
    jitted = jax.jit(lambda p, v: net.apply(p, v, batch_ndim=1))(params, x)
    mapped = jax.vmap(lambda v: net.apply(params, v, batch_ndim=0))(x)
    np.testing.assert_allclose(jitted, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mapped, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, groups", [((3, 6), 3), ((3, 5, 6), 2), ((2, 4, 5, 6), 3)])
def test_group_norm_matches_torch_with_channels_moved_first(rng, shape, groups):
    torch = pytest.importorskip("torch")
    channels = shape[-1]
    module = torch.nn.GroupNorm(groups, channels, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(rng.normal(size=channels), dtype=torch.float32))
        module.bias.copy_(torch.tensor(rng.normal(size=channels), dtype=torch.float32))
    x = rng.normal(size=shape).astype(np.float32)
    channels_first = np.moveaxis(x, -1, 1)
    with torch.no_grad():
        expected = np.moveaxis(module(torch.tensor(channels_first)).numpy(), 1, -1)
    params = {"scale": jnp.asarray(module.weight.detach().numpy()),
              "bias": jnp.asarray(module.bias.detach().numpy())}
    y = jn.GroupNorm(groups).apply(params, jnp.asarray(x), batch_ndim=1)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_group_norm_keeps_examples_independent(rng):
    net = jn.GroupNorm(2, use_scale=False, use_bias=False)
    x = normal(rng, (3, 4, 4))
    changed = x.at[0].set(normal(rng, (4, 4), scale=10.0))
    params = net.init(jax.random.key(0), x)
    assert params == {}
    np.testing.assert_array_equal(net.apply(params, x, batch_ndim=1)[1:],
                                  net.apply(params, changed, batch_ndim=1)[1:])


def test_group_norm_after_a_convolution_needs_no_batch_ndim(rng):
    net = jn.serial(jn.Conv2D(4, 3), jn.GroupNorm(2))
    x = normal(rng, (6, 5, 5, 3))
    params = jax.tree.map(lambda a: a * 0.5, random_params(net, x[:1], rng))
    assert_contract(net, params, x)


def test_group_norm_computes_bfloat16_statistics_in_float32(rng):
    x = normal(rng, (2, 8, 4), loc=50.0).astype(jnp.bfloat16)
    net = jn.GroupNorm(2)
    y = net.apply(net.init(jax.random.key(0), x), x, batch_ndim=1)
    assert y.dtype == jnp.bfloat16
    expected = group_norm_reference(np.asarray(x, np.float64), 2, {}, 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-2, atol=2e-2)


def test_group_norm_gradients_match_finite_differences(rng):
    net = jn.GroupNorm(2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 4)))
        params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)),
                              net.init(jax.random.key(0), x))
        check_grads(lambda p, v: net.apply(p, v, batch_ndim=1), (params, x), order=2, modes=("rev",))


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: jn.RMSNorm(epsilon=0.0), "RMSNorm: epsilon must be a positive number, got 0.0"),
    (lambda: jn.GroupNorm(0), "GroupNorm: num_groups must be a positive integer, got 0"),
    (lambda: jn.GroupNorm(2.0), "GroupNorm: num_groups must be a positive integer, got 2.0"),
    (lambda: jn.GroupNorm(2, epsilon=-1), "GroupNorm: epsilon must be a positive number, got -1"),
])
def test_bad_constructor_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("net, x, error, message", [
    (jn.GroupNorm(3), (2, 5, 8), ShapeError,
     r"group_norm: num_groups=3 must divide the 8 channels \(last axis of examples of shape \(5, 8\)\)"),
    (jn.GroupNorm(2), jnp.ones((2, 4), jnp.int32), TypeError, "expected a floating-point input, got int32"),
    (jn.RMSNorm(), jnp.ones((2, 4), jnp.int32), TypeError, "expected a floating-point input, got int32"),
    (jn.RMSNorm(), (5,), ShapeError, "expected examples with a feature axis"),
    (jn.GroupNorm(1), (5,), ShapeError, "expected examples with a feature axis"),
])
def test_bad_inputs_raise_clear_errors(net, x, error, message):
    with pytest.raises(error, match=message):
        net.init(jax.random.key(0), x)
