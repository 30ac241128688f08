import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet import metrics


def test_accuracy_and_top_k_match_numpy(rng):
    logits = rng.normal(size=(50, 6))
    labels = rng.integers(0, 6, size=50)
    ranks = (logits > logits[np.arange(50), labels][:, None]).sum(-1)
    for k in (1, 2, 6):
        got = metrics.top_k_accuracy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), k=k)
        np.testing.assert_allclose(got, (ranks < k).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics.accuracy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)),
                               (logits.argmax(-1) == labels).mean(), rtol=1e-6)


def test_top_k_range():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\], got 4"):
        metrics.top_k_accuracy(jnp.zeros((2, 3)), jnp.asarray([0, 1]), k=4)


def test_confusion_matrix_matches_numpy(rng):
    labels, predictions = rng.integers(0, 4, size=100), rng.integers(0, 4, size=100)
    expected = np.zeros((4, 4), int)
    np.add.at(expected, (labels, predictions), 1)
    got = metrics.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), 4)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == jnp.int32


def test_confusion_matrix_rejects_out_of_range_predictions():
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 3\).*found 3"):
        metrics.confusion_matrix(jnp.asarray([0, 3]), jnp.asarray([0, 1]), 3)


_SPECIAL = st.sampled_from([-np.inf, -1.0, 0.0, 1.0, np.inf, np.nan])


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6).flatmap(lambda c: st.tuples(
    st.lists(st.lists(_SPECIAL, min_size=c, max_size=c), min_size=1, max_size=8),
    st.lists(st.integers(-1, c), min_size=8, max_size=8))))
def test_is_argmax_equals_jnp_argmax_with_ties_nans_and_infinities(case):
    rows, labels = case
    logits = jnp.asarray(rows, jnp.float32)
    labels = jnp.asarray(labels[:len(rows)], jnp.int32)
    np.testing.assert_array_equal(metrics.is_argmax(logits, labels),
                                  jnp.argmax(logits, axis=-1) == labels)


def test_is_argmax_on_batched_leading_axes(rng):
    logits = jnp.asarray(rng.integers(-2, 3, size=(3, 4, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=(3, 4)))
    np.testing.assert_array_equal(metrics.is_argmax(logits, labels),
                                  jnp.argmax(logits, axis=-1) == labels)
