"""The epoch shuffle: jaxnet.train.shuffle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import train
from jaxnet.train import shuffle

# chi-square 0.999 quantiles: above them a uniform distribution is rejected
CHI2_999 = {9: 27.88, 99: 148.23}


def feistel_reference(key, n):
    """The documented permutation in NumPy: 64-bit products for the scaling, a Python loop
    for the cycle walk of each index."""
    a = math.ceil(math.sqrt(n))
    while (a - 1) * (a - 1) >= n:  # exact integer ceil(sqrt(n))
        a -= 1
    while a * a < n:
        a += 1
    b = -(-n // a)
    round_keys = np.asarray(jax.random.bits(key, (shuffle.FEISTEL_ROUNDS,), jnp.uint32))

    def mix(x):
        x = np.uint64(x)
        x = ((x ^ (x >> np.uint64(16))) * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
        x = ((x ^ (x >> np.uint64(15))) * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
        return x ^ (x >> np.uint64(16))

    def permute(i):
        sizes, (left, right) = [a, b], divmod(i, b)
        for k in round_keys:
            f = int((mix(np.uint32(right) ^ k) * np.uint64(sizes[0])) >> np.uint64(32))
            left, right = right, (left + f) % sizes[0]
            sizes.reverse()
        return left * sizes[1] + right

    order = []
    for i in range(n):
        j = permute(i)
        while j >= n:
            j = permute(j)
        order.append(j)
    return np.asarray(order)


@pytest.mark.parametrize("n", [4097, 5000, 65536, 10007])  # 65536 = 256^2: nothing to walk
def test_feistel_order_matches_a_numpy_reference(n):
    key = jax.random.key(n)
    got = np.asarray(jax.jit(shuffle.feistel_order, static_argnums=1)(key, n))
    np.testing.assert_array_equal(got, feistel_reference(key, n))
    assert got.dtype == np.int32


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 4097, 99991, 2 ** 17])
def test_feistel_order_is_a_permutation_and_depends_on_the_key(n):
    a = np.asarray(shuffle.feistel_order(jax.random.key(0), n))
    b = np.asarray(jax.jit(shuffle.feistel_order, static_argnums=1)(jax.random.key(1), n))
    np.testing.assert_array_equal(np.sort(a), np.arange(n))
    np.testing.assert_array_equal(np.sort(b), np.arange(n))
    if n > 3:
        assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(n))


def test_feistel_order_under_vmap_matches_each_key():
    keys = jax.random.split(jax.random.key(3), 4)
    batched = jax.vmap(shuffle.feistel_order, (0, None))(keys, 5000)
    for k, row in zip(keys, batched):
        np.testing.assert_array_equal(row, shuffle.feistel_order(k, 5000))


def test_shuffled_order_sorts_small_sets_and_uses_the_feistel_permutation_above():
    key = jax.random.key(5)
    small, large = shuffle.SORTED_MAX, shuffle.SORTED_MAX + 1
    np.testing.assert_array_equal(train.shuffled_order(key, small),
                                  shuffle.sorted_order(key, small))
    np.testing.assert_array_equal(train.shuffled_order(key, large),
                                  shuffle.feistel_order(key, large))


def _chi2(counts):
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("order_fn, n", [(shuffle.sorted_order, 10), (shuffle.sorted_order, 1000),
                                         (shuffle.feistel_order, 5000),
                                         (shuffle.feistel_order, 20000)])
def test_positions_and_pairs_of_positions_are_uniform(order_fn, n):
    """Over 2,000 keys: where index 0 (and the last index) lands, in 10 bins of positions, and
    where two indices land together (10 x 10 bins), pass a chi-square test at 0.1%; and two
    neighbouring indices share a batch of 32 as often as in a uniform shuffle."""
    keys = jax.random.split(jax.random.key(11), 2000)
    orders = np.asarray(jax.jit(jax.vmap(order_fn, (0, None)), static_argnums=1)(keys, n))
    positions = np.argsort(orders, axis=1)  # positions[k, i]: where index i went
    bins = positions * 10 // n
    for i in (0, n - 1):
        assert _chi2(np.bincount(bins[:, i], minlength=10)) < CHI2_999[9]
    for i, j in ((0, 1), (0, n // 2), (n - 2, n - 1)):
        joint = np.bincount(bins[:, i] * 10 + bins[:, j], minlength=100)
        if n == 10:  # two indices never share a position: leave out the diagonal
            joint = joint[~np.eye(10, dtype=bool).ravel()]
            assert _chi2(joint) < 123.6  # df 89
        else:
            assert _chi2(joint) < CHI2_999[99]
    if n >= 1000:
        batch = positions[:, :1000] // 32
        same = np.mean(batch[:, :-1] == batch[:, 1:])
        assert abs(same - 31 / (n - 1)) < 0.3 * 31 / (n - 1)


@pytest.mark.parametrize("high", [2 ** 32, 7])  # 7: most keys tie, ties keep index order
def test_packed_sort_equals_the_key_value_sort(rng, high):
    keys = jnp.asarray(rng.integers(0, high, size=5000, dtype=np.uint64).astype(np.uint32))
    expected = np.argsort(np.asarray(keys), kind="stable")
    np.testing.assert_array_equal(jax.jit(shuffle._sort_packed)(keys), expected)
    np.testing.assert_array_equal(jax.jit(shuffle._sort_key_val)(keys), expected)
    assert jax.jit(shuffle._sort_packed)(keys).dtype == jnp.int32
