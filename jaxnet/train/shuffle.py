"""An epoch's shuffle: a random permutation of ``arange(n)`` drawn on the device.

Up to :data:`SORTED_MAX` examples the permutation comes from one sort by random 32-bit keys,
uniform except that the rare equal keys keep their index order. XLA:CPU's sort is slow
enough that for small networks on tens of thousands of examples it is a large part of an
epoch (docs/performance.md, findings 6 and 19), so larger data sets use
:func:`feistel_order`, a keyed pseudorandom permutation computed elementwise without a sort.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SORTED_MAX = 4096  # the largest n shuffled by a sort: exactly uniform, and cheap at this size
FEISTEL_ROUNDS = 6


def shuffled_order(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of ``arange(n)``: ``(n,)`` int32, a function of ``key`` only.

    ``n <= SORTED_MAX``: one sort by random keys (:func:`sorted_order`); larger ``n``:
    :func:`feistel_order`.
    """
    return sorted_order(key, n) if n <= SORTED_MAX else feistel_order(key, n)


def sorted_order(key: jax.Array, n: int) -> jax.Array:
    """``arange(n)`` sorted by ``n`` random 32-bit keys drawn from ``key``: ``(n,)`` int32.

    ``jax.random.permutation`` sorts several times; one sort is uniform except that the rare
    equal keys keep their index order.
    """
    keys = jax.random.bits(key, (n,), jnp.uint32)
    return jax.lax.platform_dependent(keys, cpu=_sort_packed, default=_sort_key_val)


def _sort_key_val(keys: jax.Array) -> jax.Array:
    return jax.lax.sort_key_val(keys, jnp.arange(keys.shape[0], dtype=jnp.int32))[1]


def _sort_packed(keys: jax.Array) -> jax.Array:
    """The same permutation as :func:`_sort_key_val`, from one sort of ``key << 32 | index`` as
    uint64: XLA:CPU sorts one array of numbers much faster than keys with a payload
    (docs/performance.md, finding 6)."""
    with jax.enable_x64(True):
        packed = keys.astype(jnp.uint64) << 32 | jnp.arange(keys.shape[0], dtype=jnp.uint64)
        return (jax.lax.sort(packed) & 0xFFFFFFFF).astype(jnp.int32)


def feistel_order(key: jax.Array, n: int) -> jax.Array:
    """A keyed pseudorandom permutation of ``arange(n)``: ``(n,)`` int32, without a sort.

    Index ``i`` goes to ``order[i] = P(i)``, where ``P`` is a bijection of ``[0, a * b)``
    (``a = ceil(sqrt(n))``, ``b = ceil(n / a)``): an index is the pair ``(i // b, i % b)``,
    and each of :data:`FEISTEL_ROUNDS` rounds maps ``(left, right)`` in ``Z_s x Z_t`` to
    ``(right, (left + F_r(right)) mod s)`` in ``Z_t x Z_s``, with ``F_r`` a 32-bit integer hash
    of ``right`` xor the round's key (``jax.random.bits(key)``) scaled into ``[0, s)``. Values
    that land in ``[n, a * b)`` (fewer than ``a`` of them) are mapped again until they fall
    in ``[0, n)`` (cycle walking), which keeps ``P`` a bijection of ``[0, n)``.

    This is the construction of format-preserving ciphers and of index shuffles in data
    loaders: not uniform over all ``n!`` orders, but its deviations are below what the tests'
    statistics detect for ``n`` above ``SORTED_MAX`` (tests/test_shuffle.py).
    """
    if n < 2:
        return jnp.zeros((n,), jnp.int32)
    a = math.isqrt(n - 1) + 1  # ceil(sqrt(n)), below 2**16 for any int32 n
    b = -(-n // a)
    round_keys = jax.random.bits(key, (FEISTEL_ROUNDS,), jnp.uint32)

    def permute(x):  # a bijection of [0, a * b), uint32
        left, right = x // jnp.uint32(b), x % jnp.uint32(b)
        size_left, size_right = a, b
        for r in range(FEISTEL_ROUNDS):
            mixed = left + _scale(_hash(right ^ round_keys[r]), size_left)
            left, right = right, jnp.where(mixed >= size_left, mixed - jnp.uint32(size_left),
                                           mixed)
            size_left, size_right = size_right, size_left
        return left * jnp.uint32(size_right) + right

    order = permute(jnp.arange(n, dtype=jnp.uint32))
    order = jax.lax.while_loop(lambda x: jnp.any(x >= n),
                               lambda x: jnp.where(x >= n, permute(x), x), order)
    return order.astype(jnp.int32)


def _hash(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (two multiply-xorshift rounds), uint32."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _scale(h: jax.Array, s: int) -> jax.Array:
    """``floor(h * s / 2**32)`` in uint32 arithmetic (``s < 2**16``): ``h`` scaled into
    ``[0, s)`` without a division."""
    return ((h >> 16) * jnp.uint32(s) + (((h & 0xFFFF) * jnp.uint32(s)) >> 16)) >> 16
