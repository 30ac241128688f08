"""Positional encodings: the learned table, the sinusoidal table and rotary embeddings (apply_rotary)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64, random_params
from jaxnet.nn.layer import ShapeError
from test_attention import rotary_reference


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def run(net, params, x):
    return net.forward(params, {}, x, train=False, key=None)[0]


# ---- apply_rotary ------------------------------------------------------------------------

def rotate(x, positions, base=10000.0):
    """float64 reference for ``x`` ``(..., time, dim)``: each pair ``(i, i + dim/2)`` as a complex number
    times ``exp(1j * position * base**(-2i/dim))``."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    angles = np.asarray(positions, np.float64)[:, None] * base ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_apply_rotary_matches_numpy_rotation_of_feature_pairs(rng, base):
    x = normal(rng, (2, 7, 3, 8))  # (batch, time, heads, head_dim)
    y = jax.jit(jn.apply_rotary, static_argnums=2)(x, jnp.arange(7)[:, None], base)
    np.testing.assert_allclose(y, rotary_reference(np.asarray(x, np.float64), base), rtol=1e-5, atol=1e-5)


def test_apply_rotary_takes_positions_of_any_broadcastable_shape(rng):
    x = normal(rng, (2, 5, 6))  # (batch, time, dim)
    by_time = jn.apply_rotary(x, jnp.arange(5))
    per_example = jn.apply_rotary(x, jnp.broadcast_to(jnp.arange(5), (2, 5)))
    as_heads = jn.apply_rotary(x[:, :, None, :], jnp.arange(5)[:, None])[:, :, 0]
    np.testing.assert_array_equal(by_time, per_example)
    np.testing.assert_allclose(by_time, as_heads, rtol=1e-6, atol=1e-6)
    shifted = jn.apply_rotary(x, jnp.arange(5.0) + 2.5)  # floating positions
    np.testing.assert_allclose(shifted, rotate(x, np.arange(5) + 2.5), rtol=1e-5, atol=1e-5)


def test_apply_rotary_keeps_norms_and_is_identity_at_position_zero(rng):
    x = normal(rng, (4, 10))
    y = jn.apply_rotary(x, jnp.asarray([0, 1, 50, 1000]))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[0], x[0], rtol=1e-6)


def test_rotary_scores_depend_only_on_relative_positions(rng):
    dim, time = 8, 6
    q0, k0 = rng.normal(size=dim), rng.normal(size=dim)
    positions = np.arange(time)
    for shift in (0, 3, 117):
        q = jn.apply_rotary(jnp.broadcast_to(jnp.asarray(q0, jnp.float32), (time, dim)), positions + shift)
        k = jn.apply_rotary(jnp.broadcast_to(jnp.asarray(k0, jnp.float32), (time, dim)), positions + shift)
        scores = np.asarray(q @ k.T, np.float64)
        if shift == 0:
            reference = scores
            # a Toeplitz matrix: scores[m, n] is a function of m - n
            for d in range(-time + 1, time):
                diagonal = np.diagonal(scores, d)
                np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores, reference, rtol=1e-3, atol=1e-3)


def test_rotary_attention_scores_depend_only_on_relative_positions(rng):
    """Inside attention: a sequence of one repeated vector gives a Toeplitz score matrix."""
    net = jn.MultiHeadAttention(1, rotary=True, use_bias=False)
    x = jnp.broadcast_to(normal(rng, (1, 1, 8)), (1, 6, 8))
    params = random_params(net, x, rng)
    q = jn.apply_rotary((x @ params["query"]["w"])[:, :, None, :], jnp.arange(6)[:, None])[0, :, 0]
    k = jn.apply_rotary((x @ params["key"]["w"])[:, :, None, :], jnp.arange(6)[:, None])[0, :, 0]
    scores = np.asarray(q @ k.T)
    for d in range(-5, 6):
        np.testing.assert_allclose(np.diagonal(scores, d), np.diagonal(scores, d)[0], rtol=1e-4, atol=1e-4)


def test_apply_rotary_gradients_match_finite_differences(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 4)))
        check_grads(lambda v: jn.apply_rotary(v, jnp.arange(3)), (x,), order=2, modes=("rev",))


def test_apply_rotary_rounds_bfloat16_once(rng):
    x = normal(rng, (5, 8))
    y = jn.apply_rotary(x.astype(jnp.bfloat16), jnp.arange(5))
    assert y.dtype == jnp.bfloat16
    expected = jn.apply_rotary(x.astype(jnp.bfloat16).astype(jnp.float32), jnp.arange(5))
    np.testing.assert_array_equal(y, expected.astype(jnp.bfloat16))


@pytest.mark.parametrize("x, positions, error, message", [
    (jnp.ones((4, 5)), jnp.arange(4), ShapeError,
     r"the last axis of x must have an even, nonzero size; got x of shape \(4, 5\)"),
    (jnp.ones((4, 6), jnp.int32), jnp.arange(4), TypeError, "x must be floating, got int32"),
    (jnp.ones((4, 6)), jnp.arange(5), ShapeError,
     r"positions of shape \(5,\) do not broadcast against x.shape\[:-1\] = \(4,\)"),
    (jnp.ones((4, 6)), jnp.ones((2, 4)), ShapeError, r"positions of shape \(2, 4\) do not broadcast"),
    (jnp.ones((4, 6)), jnp.ones(4, bool), TypeError, "positions must be numbers, got bool"),
])
def test_apply_rotary_rejects_bad_arguments(x, positions, error, message):
    with pytest.raises(error, match="apply_rotary: " + message):
        jn.apply_rotary(x, positions)


# ---- LearnedPositionalEmbedding ------------------------------------------------------------

def test_learned_positional_embedding_adds_its_table(rng):
    net = jn.LearnedPositionalEmbedding(9)
    x = normal(rng, (6, 5, 4))
    params = random_params(net, x[:1], rng)
    assert params["table"].shape == (9, 4)
    y = assert_contract(net, params, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) + f64(params)["table"][None, :5], rtol=1e-6)


def test_learned_positional_embedding_starts_small(key):
    params = jn.LearnedPositionalEmbedding(64).init(key, (1, 3, 32))
    assert params["table"].dtype == jnp.float32
    assert 0.01 < float(jnp.std(params["table"])) < 0.03


def test_learned_positional_embedding_passes_a_mask_through(rng):
    net = jn.LearnedPositionalEmbedding(5)
    x, mask = normal(rng, (2, 5, 3)), jnp.asarray([[True] * 5, [True, True, False, False, False]])
    params = random_params(net, x, rng)
    y, out_mask = run(net, params, (x, mask))
    assert out_mask is mask
    np.testing.assert_array_equal(y, run(net, params, x))


def test_learned_positional_embedding_gradients_match_finite_differences(rng):
    net = jn.LearnedPositionalEmbedding(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 2)))
        params = net.init(jax.random.key(0), x)
        check_grads(net.apply, (params, x), order=1, modes=("rev",))


@pytest.mark.parametrize("net, shape, error, message", [
    (jn.LearnedPositionalEmbedding(4), (2, 5, 3), ShapeError,
     "positional_embedding: sequences of length 5 are longer than max_length=4"),
    (jn.LearnedPositionalEmbedding(4), (2, 3), ShapeError,
     r"expected examples of shape \(time, features\) \(rank 2\)"),
    (jn.SinusoidalPositionalEncoding(4), (2, 5, 3), ShapeError,
     "sinusoidal: sequences of length 5 are longer than max_length=4"),
])
def test_positional_layers_reject_bad_inputs(net, shape, error, message):
    with pytest.raises(error, match=message):
        net.init(jax.random.key(0), shape)


def test_positional_layers_reject_integer_inputs_and_bad_lengths():
    with pytest.raises(TypeError, match="expected a floating-point input, got int32"):
        jn.LearnedPositionalEmbedding(4).init(jax.random.key(0), jnp.ones((1, 2, 3), jnp.int32))
    with pytest.raises(ValueError, match="LearnedPositionalEmbedding: max_length must be a positive "
                                         "integer, got 0"):
        jn.LearnedPositionalEmbedding(0)
    with pytest.raises(ValueError, match="SinusoidalPositionalEncoding: max_length must be a positive"):
        jn.SinusoidalPositionalEncoding(-3)


def test_learned_positional_embedding_rejects_long_sequences_at_apply(rng):
    net = jn.LearnedPositionalEmbedding(4)
    params = net.init(jax.random.key(0), (1, 4, 3))
    with pytest.raises(ShapeError, match="longer than max_length=4"):
        net.forward(params, {}, normal(rng, (1, 6, 3)), train=False, key=None)


# ---- SinusoidalPositionalEncoding ----------------------------------------------------------

@pytest.mark.parametrize("features", [1, 6, 7])
def test_sinusoidal_encoding_adds_the_sin_cos_table(rng, features):
    net = jn.SinusoidalPositionalEncoding()
    x = normal(rng, (6, 5, features))
    params = net.init(jax.random.key(0), x)
    assert params == {}
    y = assert_contract(net, params, x)
    table = np.zeros((5, features))
    for pos in range(5):
        for i in range(features):
            rate = pos / 10000 ** ((i - i % 2) / features)
            table[pos, i] = math.sin(rate) if i % 2 == 0 else math.cos(rate)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) + table[None], rtol=1e-6, atol=1e-6)


def test_sinusoidal_encoding_passes_a_mask_through_and_keeps_bfloat16(rng):
    net = jn.SinusoidalPositionalEncoding(8)
    x, mask = normal(rng, (2, 4, 6), jnp.bfloat16), jnp.ones((2, 4), bool)
    y, out_mask = run(net, {}, (x, mask))
    assert y.dtype == jnp.bfloat16 and out_mask is mask


def test_positional_layers_keep_examples_independent(rng):
    x = normal(rng, (3, 5, 4))
    changed = x.at[0].set(normal(rng, (5, 4)))
    for net in (jn.LearnedPositionalEmbedding(6), jn.SinusoidalPositionalEncoding()):
        params = net.init(jax.random.key(0), x)
        np.testing.assert_array_equal(net.apply(params, x)[1:], net.apply(params, changed)[1:])
