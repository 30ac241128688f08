import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxnet import losses


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_softmax_cross_entropy_matches_numpy(rng, smoothing):
    logits = rng.normal(size=(7, 5)) * 3
    labels = rng.integers(0, 5, size=7)
    targets = np.eye(5)[labels] * (1 - smoothing) + smoothing / 5
    expected = -(targets * np_log_softmax(logits)).sum(-1)
    got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                       label_smoothing=smoothing)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_softmax_cross_entropy_gradients(rng):
    labels = jnp.asarray(rng.integers(0, 4, size=6))
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    check_grads(lambda z: losses.softmax_cross_entropy(z, labels).sum(), (logits,), order=2,
                modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("bad", [-1, 5, 17])
def test_labels_out_of_range_raise(bad):
    labels = jnp.asarray([0, 1, bad])
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 5\).*found {bad} at index 2"):
        losses.softmax_cross_entropy(jnp.zeros((3, 5)), labels)


def test_traced_labels_out_of_range_give_nan_not_a_number():
    out = jax.jit(losses.softmax_cross_entropy)(jnp.ones((3, 5)), jnp.asarray([0, 5, -1]))
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


def test_float_labels_are_a_type_error():
    with pytest.raises(TypeError, match="labels must be integer class indices, got dtype float32"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.asarray([0.0, 1.0]))


def test_label_smoothing_range():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.asarray([0, 1]), label_smoothing=1.0)


def test_sigmoid_binary_cross_entropy_matches_numpy(rng):
    logits = rng.normal(size=(4, 3)) * 2
    labels = rng.integers(0, 2, size=(4, 3))
    p = 1 / (1 + np.exp(-logits))
    expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(-1)
    got = losses.sigmoid_binary_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mean_squared_error_matches_numpy(rng):
    a, b = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 3))
    got = losses.mean_squared_error(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, ((a - b) ** 2).reshape(5, -1).mean(-1), rtol=1e-5)


def test_mean_squared_error_shape_mismatch():
    with pytest.raises(ValueError, match=r"predictions \(2, 3\) and targets \(2, 4\)"):
        losses.mean_squared_error(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
