import jax.numpy as jnp
import numpy as np
import pytest

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




def test_accuracy_counts_the_first_of_tied_maxima_and_the_first_nan():
    logits = jnp.asarray([[1, 1, 0], [0, 2, 2], [np.nan, 1, np.nan], [0, np.nan, 5]], jnp.float32)
    labels = jnp.asarray([0, 2, 0, 1])
    np.testing.assert_array_equal(metrics.correct(logits, labels), [True, False, True, True])
    assert float(metrics.accuracy(logits, labels)) == 0.75
