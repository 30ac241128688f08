"""Maxima that keep NaN on XLA:CPU, as NumPy, PyTorch and XLA's other backends do.

XLA:CPU (jax 0.10) hands max reductions, ``reduce_window`` included, to YNNPACK, whose maximum
skips NaN: ``jnp.max`` over a ``(4000, 3)`` float32 array with a NaN in every row returns each
row's largest number (docs/performance.md, finding 22). A NaN reaching a max pool would vanish
silently. Sums keep NaN, so :func:`max_over` (``GlobalMaxPool``'s maximum) adds a sum of the NaN
inputs to the maximum of :func:`without_nans`: a NaN anywhere in the reduced elements makes the
result NaN, and its gradient goes to the NaN inputs, on every backend and at every size.
``MaxPool`` does not yet: doing so cost its training and prediction speed (finding 22).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nan_terms(x: jax.Array) -> jax.Array:
    """``x`` where it is NaN, 0 elsewhere: summed over a window, NaN exactly where one is."""
    return jnp.where(jnp.isnan(x), x, jnp.zeros_like(x))


def without_nans(x: jax.Array) -> jax.Array:
    """``x`` with NaN replaced by ``-inf``: its maximum is the same on every backend."""
    return jnp.where(jnp.isnan(x), jnp.asarray(-jnp.inf, x.dtype), x)


def with_nans(maximum: jax.Array, nan_sums: jax.Array) -> jax.Array:
    """``maximum`` made NaN where ``nan_sums`` (the sums of :func:`nan_terms` over the same
    elements) is."""
    return jnp.where(jnp.isnan(nan_sums), nan_sums, maximum)


def max_over(x: jax.Array, axis, keepdims: bool = False) -> jax.Array:
    """``jnp.max(x, axis, keepdims=keepdims)``, NaN wherever a reduced element is NaN.

    Args:
      x: any real dtype (integers take ``jnp.max`` directly); axis: an int or tuple of ints.
    """
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.max(x, axis=axis, keepdims=keepdims)
    return with_nans(jnp.max(without_nans(x), axis=axis, keepdims=keepdims),
                     jnp.sum(nan_terms(x), axis=axis, keepdims=keepdims))

