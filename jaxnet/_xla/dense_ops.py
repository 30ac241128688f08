"""``x @ w`` whose gradients run in the forms XLA:CPU runs fast, optionally on bfloat16 operands.

The weight gradient of ``y = x @ w`` is ``x.T @ g``: a product that contracts the batch axis,
the leading axis of both operands. XLA:CPU folds the transpose into the dot and runs it on a
generic path that is slow for narrow layers, several times slower than the same numbers computed
as ``(g.T @ x).T`` with the transposes kept as copies (``lax.optimization_barrier``) so that the
product is an ordinary row-by-column one. For wide layers (784x512) the ordinary ``x.T @ g`` is
faster, so :func:`matmul` switches at :data:`NARROW` output features (docs/performance.md,
finding 7).

With an ``operand_dtype`` (bfloat16 under the ``"bf16"`` precision policy) every product, the
forward one and both gradient ones, rounds its operands to it and accumulates in float32
(``jaxnet._xla.mixed``); the results and gradients keep ``x``'s and ``w``'s dtypes. The
gradient products then take their transposed operands as row-major copies
(``mixed.transposed``): XLA:CPU runs a bfloat16 dot on a transposed operand in float32.

Being a ``custom_vjp``, :func:`matmul` supports reverse mode only; ``Dense`` uses it when the
caller promises reverse mode only (``apply_with_state(..., reverse_only=True)``, as
``train_batch`` and so ``fit`` do) and :func:`product` otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxnet._xla import mixed

NARROW = 128  # layers with fewer output features get the transposed weight gradient on CPU


def _matmul(a, b, preferred_element_type):
    return jnp.matmul(a, b, preferred_element_type=preferred_element_type)


def product(x: jax.Array, w: jax.Array, operand_dtype=None) -> jax.Array:
    """``x (..., in) @ w (in, out) -> (..., out)``, differentiable in every mode.

    With ``operand_dtype`` the product runs on rounded operands, accumulated in float32, and its
    derivatives are float32 products of the rounded values (``mixed.straight_through``).
    """
    if operand_dtype is None:
        return x @ w
    return mixed.straight_through(_matmul, x, w, operand_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, operand_dtype=None) -> jax.Array:
    """``x (..., in) @ w (in, out) -> (..., out)`` in ``x``'s dtype, with a CPU-friendly weight
    gradient; with ``operand_dtype``, every product (forward and both gradients) rounds its
    operands to it and accumulates in float32."""
    return mixed.product(_matmul, x, w, operand_dtype).astype(jnp.result_type(x, w))


def _matmul_fwd(x, w, operand_dtype):
    return matmul(x, w, operand_dtype), (x, w)


def _matmul_bwd(operand_dtype, residuals, g):
    x, w = residuals  # the unrounded operands: the gradients take their dtypes
    rows, cols = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (batch, in), (batch, out)
    dx = mixed.product(_matmul, g, mixed.transposed(w, operand_dtype), operand_dtype)
    return dx.astype(x.dtype), weight_grad(rows, cols, operand_dtype).astype(w.dtype)


def weight_grad(rows: jax.Array, cols: jax.Array, operand_dtype=None) -> jax.Array:
    """``rows.T @ cols``, ``(n, in), (n, out) -> (in, out)``: the weight gradient of ``rows @ w``
    for the output gradient ``cols``, in the orientation XLA:CPU runs fast for the width ``out``
    (the transposed form below :data:`NARROW` features); with ``operand_dtype`` on rounded
    operands, accumulated and returned in float32."""
    if cols.shape[-1] < NARROW:
        return lax.platform_dependent(
            rows, cols, cpu=functools.partial(_transposed_weight_grad, operand_dtype=operand_dtype),
            default=functools.partial(_weight_grad, operand_dtype=operand_dtype))
    return _weight_grad(rows, cols, operand_dtype)


def _weight_grad(x, g, operand_dtype):
    return mixed.product(_matmul, mixed.transposed(x, operand_dtype), g, operand_dtype)


def _transposed_weight_grad(x, g, operand_dtype):
    """``(g.T @ x).T`` with both transposes materialised, so XLA cannot fold them back (with
    ``operand_dtype``, ``g.T`` is a row-major copy of the rounded ``g``)."""
    barrier = lax.optimization_barrier
    g_t = barrier(g.T) if operand_dtype is None else mixed.transposed(g, operand_dtype)
    return barrier(mixed.product(_matmul, g_t, x, operand_dtype)).T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_transposed(x: jax.Array, w: jax.Array, operand_dtype=None) -> jax.Array:
    """``x (..., in) @ w.T`` for ``w (out, in)`` ``-> (..., out)`` in ``x``'s dtype: a tied
    embedding table's output projection, as :func:`matmul` with every product (forward and both
    gradients) in the orientation XLA:CPU keeps in bfloat16.

    Through ``matmul(x, w.T)``, autodiff transposes the weight gradient back, XLA folds that
    transpose into the dot, and XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for the
    folded orientation (``Unsupported element type for DotThunk::Execute``).
    """
    return mixed.product(_matmul, x, mixed.transposed(w, operand_dtype),
                         operand_dtype).astype(jnp.result_type(x, w))


def _matmul_transposed_fwd(x, w, operand_dtype):
    return matmul_transposed(x, w, operand_dtype), (x, w)


def _matmul_transposed_bwd(operand_dtype, residuals, g):
    x, w = residuals
    rows, cols = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (batch, in), (batch, out)
    dw = mixed.product(_matmul, mixed.transposed(cols, operand_dtype), rows, operand_dtype)
    dx = mixed.product(_matmul, g, w, operand_dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul_transposed.defvjp(_matmul_transposed_fwd, _matmul_transposed_bwd)
