"""``x @ w`` whose weight gradient is computed in the orientation XLA:CPU runs fast.

The weight gradient of ``y = x @ w`` is ``x.T @ g``: a product that contracts the batch axis,
the leading axis of both operands. XLA:CPU folds the transpose into the dot and runs it on a
generic path that is slow for narrow layers, several times slower than the same numbers computed
as ``(g.T @ x).T`` with the transposes kept as copies (``lax.optimization_barrier``) so that the
product is an ordinary row-by-column one. For wide layers (784x512) the ordinary ``x.T @ g`` is
faster, so :func:`matmul` switches at :data:`NARROW` output features (docs/performance.md,
finding 7).

Being a ``custom_vjp``, :func:`matmul` supports reverse mode only; ``Dense`` uses it when the
caller promises reverse mode only (``apply_with_state(..., reverse_only=True)``, as
``train_batch`` and so ``fit`` do) and plain ``x @ w`` otherwise.
"""

from __future__ import annotations

import jax
from jax import lax

NARROW = 128  # layers with fewer output features get the transposed weight gradient on CPU


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., in) @ w (in, out) -> (..., out)``, with a CPU-friendly weight gradient."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    rows, cols = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (batch, in), (batch, out)
    if w.shape[-1] < NARROW:
        dw = lax.platform_dependent(rows, cols, cpu=_transposed_weight_grad,
                                    default=_weight_grad)
    else:
        dw = _weight_grad(rows, cols)
    return g @ w.T, dw.astype(w.dtype)


def _weight_grad(x, g):
    return x.T @ g


def _transposed_weight_grad(x, g):
    """``(g.T @ x).T`` with both transposes materialised, so XLA cannot fold them back."""
    barrier = lax.optimization_barrier
    return barrier(barrier(g.T) @ x).T


matmul.defvjp(_matmul_fwd, _matmul_bwd)
