"""Scaled dot-product attention whose gradient runs fast on XLA:CPU.

``jax.nn.dot_product_attention``'s XLA implementation, differentiated by JAX, is several times
slower on CPU than PyTorch's ``scaled_dot_product_attention``. :func:`attention` computes the
same numbers with heads-major products (``(batch, heads, time, head)`` operands, plain batched
matrix products) and a custom VJP that saves the softmax and differentiates it by hand (one
elementwise pass: ``ds = p * (dp - sum(dp * p))``), faster alone and in ``fit`` (measured in
docs/performance.md, finding 18). Masked scores get the same large negative value as
``jax.nn.dot_product_attention``'s, so a query without any visible key averages all values, as
there. Being a ``custom_vjp``, it supports reverse mode only: ``MultiHeadAttention`` uses it on
CPU when the caller promises reverse mode only (``fit``) and ``jax.nn.dot_product_attention``
otherwise (and on GPU, for its fused kernels).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def _large_negative(dtype):
    """The score of a masked position: ``jax.nn.dot_product_attention``'s value."""
    return jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)


def _probabilities(q, k, mask, causal):
    """``softmax(q k^T / sqrt(head))`` with masked positions at a large negative score."""
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * jnp.asarray(1 / math.sqrt(q.shape[-1]),
                                                                    q.dtype)
    keep = mask
    if causal:
        time_q, time_k = scores.shape[-2:]
        lower = (lax.broadcasted_iota(jnp.int32, (1, 1, time_q, time_k), 2)
                 >= lax.broadcasted_iota(jnp.int32, (1, 1, time_q, time_k), 3))
        keep = lower if keep is None else keep & lower
    if keep is not None:
        scores = jnp.where(keep, scores, _large_negative(scores.dtype))
    return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              causal: bool) -> jax.Array:
    """``softmax(q k^T / sqrt(head)) v`` over heads-major operands.

    Args:
      q: ``(batch, heads, time_q, head)``; k, v: ``(batch, heads, time_k, head)``, floating.
      mask: bool, broadcastable to ``(batch, heads, time_q, time_k)`` (True = attend), or None.
      causal: query ``i`` attends to keys ``0 .. i`` only.

    Returns:
      ``(batch, heads, time_q, head)`` in ``q``'s dtype. Reverse mode only.
    """
    return jnp.matmul(_probabilities(q, k, mask, causal), v)


def _attention_fwd(q, k, v, mask, causal):
    p = _probabilities(q, k, mask, causal)
    return jnp.matmul(p, v), (q, k, v, p)


def _attention_bwd(causal, residuals, do):
    q, k, v, p = residuals
    dv = jnp.matmul(jnp.swapaxes(p, -1, -2), do)
    dp = jnp.matmul(do, jnp.swapaxes(v, -1, -2))
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    ds = ds * jnp.asarray(1 / math.sqrt(q.shape[-1]), ds.dtype)
    return jnp.matmul(ds, k), jnp.matmul(jnp.swapaxes(ds, -1, -2), q), dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
