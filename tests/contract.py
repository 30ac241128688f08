"""Shared checks of the layer contract for the layer test files."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxnet as jn


def random_params(net, x, rng):
    """Random (never zero) params of the shapes ``net.init`` would make for ``x``."""
    shapes = jax.eval_shape(net.init, jax.random.key(0), x)
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), shapes)


def f64(tree):
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)


def assert_contract(net, params, x):
    """Declared shapes, jit, vmap, one example at a time and two leading batch axes agree.

    ``x`` is a batch of 6 examples; returns ``net.apply(params, x)``, not jitted. The other
    readings of ``x`` run in one jitted function (their example rank is inferred at trace
    time all the same), so that each test compiles once.
    """
    y = net.apply(params, x)
    assert net.output_shape(x).shape == y.shape and net.output_shape(x).dtype == y.dtype, net
    assert jn.summarize(net, x).rows[-1].output_shape == y.shape, net

    @jax.jit
    def variants(params, x):
        return (net.apply(params, x), jax.vmap(net.apply, (None, 0))(params, x),
                net.apply(params, x[0]), net.apply(params, x[5]),
                net.apply(params, x.reshape((2, 3) + x.shape[1:])))  # (2, 3, *example)

    jitted, mapped, first, last, two_axes = variants(params, x)
    assert two_axes.shape == (2, 3) + y.shape[1:]
    for other, expected in ((jitted, y), (mapped, y), (first, y[0]), (last, y[5]), (two_axes.reshape(y.shape), y)):
        np.testing.assert_allclose(other, expected, rtol=1e-6, atol=1e-6)
    return y


def assert_contract_with_state(net, params, state, x, rtol=1e-6):
    """:func:`assert_contract` for a network with state, in evaluation mode (which must keep
    the state as it is): declared shapes, jit, vmap, one example and two batch axes agree.

    ``x`` is a batch of 6 examples; returns ``y`` from the un-jitted call.
    """
    y, new_state = net.apply_with_state(params, state, x)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)
    assert net.output_shape(x).shape == y.shape and net.output_shape(x).dtype == y.dtype, net
    assert jn.summarize(net, x).rows[-1].output_shape == y.shape, net

    def apply(v):
        return net.apply_with_state(params, state, v)[0]

    @jax.jit
    def variants(x):
        return apply(x), jax.vmap(apply)(x), apply(x[0]), apply(x[5]), apply(x.reshape((2, 3) + x.shape[1:]))

    jitted, mapped, first, last, two_axes = variants(x)
    assert two_axes.shape == (2, 3) + y.shape[1:]
    for other, expected in ((jitted, y), (mapped, y), (first, y[0]), (last, y[5]), (two_axes.reshape(y.shape), y)):
        np.testing.assert_allclose(other, expected, rtol=rtol, atol=1e-6)
    return y
