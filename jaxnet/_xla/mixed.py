"""Matrix products on operands rounded to a narrow dtype (bfloat16), accumulated in float32.

On a CPU with bfloat16 matrix units (AMX-BF16, AVX512-BF16) XLA:CPU runs a bfloat16 x bfloat16
product with a float32 result (``preferred_element_type=float32``) several times faster than the
float32 product, while a product with a bfloat16 result runs no faster than float32
(docs/performance.md). jaxnet's ``"bf16"`` precision policy therefore rounds only the operands of
its layers' products and keeps every result, activation and gradient in float32.

A product here is a bilinear ``op(a, b, preferred_element_type)`` such as ``jnp.matmul`` or a
``lax.conv_general_dilated`` with its geometry bound. :func:`product` runs it; the reverse-only
custom VJPs of ``dense_ops.matmul`` and ``conv_ops.conv`` run their gradient products through it
too. :func:`straight_through` is the differentiable form for callers that may need forward mode:
its derivative is that of the float32 product of the rounded values (the rounding passes
derivatives straight through), so its gradients are float32 products, accurate but not fast.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

ACCUMULATION = jnp.float32  # the dtype products accumulate and return in when operands are rounded

Product = Callable[[jax.Array, jax.Array, Any], jax.Array]  # op(a, b, preferred_element_type)


def rounded(a: jax.Array, dtype) -> jax.Array:
    """``a`` cast to ``dtype``; ``a`` itself for ``dtype=None``."""
    return a if dtype is None else a.astype(dtype)


def product(op: Product, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """``op(a, b)``; with ``dtype``, on ``a`` and ``b`` rounded to it, accumulated and returned in
    float32 (callers cast the result to the dtype they need). ``dtype=None`` is exactly
    ``op(a, b, None)``: no casts in the traced program."""
    if dtype is None:
        return op(a, b, None)
    return op(rounded(a, dtype), rounded(b, dtype), ACCUMULATION)


def transposed(a: jax.Array, dtype) -> jax.Array:
    """``a.T`` of a matrix, rounded to ``dtype`` and copied in row-major order, for a product.

    XLA:CPU keeps a bfloat16 dot in bfloat16 only when both operands are row-major matrices
    contracted on the left operand's last and the right one's first axis; a transposed operand,
    whether the dot contracts it in place or a ``transpose`` (which XLA lays out column-major,
    to make it free) feeds it, turns the dot into a float32 one on upcast operands. A reshape
    behind an optimisation barrier forces the row-major copy; ``dtype=None`` gives plain ``a.T``.
    """
    if dtype is None:
        return a.T
    t = a.astype(dtype).T
    return lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3))
def straight_through(op: Product, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """:func:`product` of ``x`` and ``w`` (``dtype`` not ``None``) in the dtype of their plain product.

    Differentiable in forward and reverse mode: the derivative is that of the plain product of
    the rounded values, ``op(dx, round(w)) + op(round(x), dw)``, in the operands' dtype.
    """
    return product(op, x, w, dtype).astype(jnp.result_type(x, w))


@straight_through.defjvp
def _straight_through_jvp(op, dtype, primals, tangents):
    x, w = primals
    tx, tw = tangents
    x_r, w_r = (a.astype(dtype).astype(a.dtype) for a in (x, w))  # the values the product sees
    return straight_through(op, x, w, dtype), op(tx, w_r, None) + op(x_r, tw, None)
