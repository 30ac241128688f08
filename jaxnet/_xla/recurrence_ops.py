"""A recurrence over time whose gradient batches the hidden weight's products over all steps.

Autodiff of a ``lax.scan`` whose body computes ``h @ w`` accumulates the weight gradient inside
the reverse loop: every step adds an ``(hidden, batch) @ (batch, G*hidden)`` product to a
running sum. :func:`scan` computes the same gradient as PyTorch's and cuDNN's recurrent kernels
do: the reverse loop only carries the state gradient (one ``(batch, G*hidden) @ (G*hidden,
hidden)`` product per step) and stacks the gate gradients, and one ``(hidden, time*batch) @
(time*batch, G*hidden)`` product after the loop gives the weight gradient. The cell's own
gradient comes from its ``combine_bwd``, which may reuse what ``combine_fwd`` saved instead of
recomputing it (the LSTM and GRU cells save their gate activations).

With an ``operand_dtype`` (bfloat16 under the ``"bf16"`` policy) every product, forward and
backward, rounds its operands to it and accumulates in float32 (``jaxnet._xla.mixed``).

A ``custom_vjp``: reverse mode only. ``Recurrent`` uses it when the caller promises reverse mode
only (``apply_with_state(..., reverse_only=True)``, as ``fit`` does) and autodiff of a plain
scan otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxnet._xla import dense_ops, mixed


class Cell(Protocol):
    """What :func:`scan` needs of a cell (``jaxnet.nn.recurrent``'s cells)."""

    def output(self, state): ...

    def combine_fwd(self, state, xp, hp) -> tuple[Any, Any]: ...

    def combine_bwd(self, residuals, d_new) -> tuple[Any, jax.Array, jax.Array]: ...


def _product(a, b, operand_dtype):
    return mixed.product(lambda u, v, p: jnp.matmul(u, v, preferred_element_type=p), a, b,
                         operand_dtype).astype(a.dtype)


def _masked(real, new, old):
    """``new`` where the step is real, ``old`` where it is padding (``real=None``: ``new``)."""
    if real is None:
        return new
    return jax.tree.map(lambda a, b: jnp.where(real[:, None], a, b), new, old)


def _forward(cell, reverse, keep_ys, operand_dtype, w, b_x, b_h, xs, state, mask_t, save):
    w_rounded = mixed.rounded(w, operand_dtype)

    def body(state, inputs):
        xp, real = inputs
        h = cell.output(state)
        hp = _product(h, w_rounded, operand_dtype).astype(xp.dtype) + b_h[None, :]
        if b_x is not None:
            xp = xp + b_x[None, :]
        new, residuals = cell.combine_fwd(state, xp, hp)
        y = _masked(real, cell.output(new), jnp.zeros_like(h)) if keep_ys else None
        return _masked(real, new, state), (y, (h, residuals) if save else None)

    return lax.scan(body, state, (xs, mask_t), reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def scan(cell: Cell, reverse: bool, keep_ys: bool, operand_dtype, w: jax.Array,
         b_x: jax.Array | None, b_h: jax.Array, xs: jax.Array, state, mask_t: jax.Array | None):
    """Runs ``cell`` over ``xs``: ``(final_state, ys)``.

    Every step computes ``hp = output(state) @ w + b_h`` and ``state = cell.combine_fwd(state,
    xs[t] (+ b_x), hp)[0]``; padded steps (``mask_t[t]`` False) keep the state and output zeros.

    Args:
      cell: a cell with ``output``, ``combine_fwd`` and ``combine_bwd`` (:class:`Cell`).
      reverse: run from the last step to the first.
      keep_ys: return every step's output; else ``ys`` is ``None``.
      operand_dtype: ``None``, or the dtype every product rounds its operands to.
      w: ``(hidden, G*hidden)`` hidden weight. b_x, b_h: ``(G*hidden,)`` biases added to every
        step's input term and hidden term (``b_x`` may be ``None``).
      xs: ``(time, batch, G*hidden)`` input terms. state: the initial state, each array
        ``(batch, hidden)``. mask_t: ``(time, batch)`` bool (True = real step) or ``None``.

    Returns:
      ``(final_state, ys)``, ``ys (time, batch, hidden)`` or ``None``.
    """
    final, (ys, _) = _forward(cell, reverse, keep_ys, operand_dtype, w, b_x, b_h, xs, state,
                              mask_t, save=False)
    return final, ys


def _scan_fwd(cell, reverse, keep_ys, operand_dtype, w, b_x, b_h, xs, state, mask_t):
    final, (ys, saved) = _forward(cell, reverse, keep_ys, operand_dtype, w, b_x, b_h, xs, state,
                                  mask_t, save=True)
    return (final, ys), (w, b_x, saved, mask_t)


def _scan_bwd(cell, reverse, keep_ys, operand_dtype, residuals, cotangents):
    w, b_x, (hs, saved), mask_t = residuals
    d_final, dys = cotangents
    w_t = mixed.transposed(w, operand_dtype)
    # the output is a linear projection of the state: its transpose adds an h gradient to a state's
    output_transpose = jax.vjp(cell.output, d_final)[1]

    def add_to_h(d_state, dh):
        return jax.tree.map(jnp.add, d_state, output_transpose(dh)[0])

    def body(d_state, inputs):
        residuals_t, dy, real = inputs
        d_new = _masked(real, d_state, jax.tree.map(jnp.zeros_like, d_state))
        if dy is not None:
            d_new = add_to_h(d_new, dy if real is None else jnp.where(real[:, None], dy, 0))
        d_prev, dxp, dhp = cell.combine_bwd(residuals_t, d_new)
        if real is not None:  # a padded step passes its state's gradient straight through
            d_prev = jax.tree.map(lambda a, d: a + jnp.where(real[:, None], 0, d), d_prev, d_state)
        d_prev = add_to_h(d_prev, _product(dhp, w_t, operand_dtype))
        return d_prev, (None if dxp is dhp else dxp, dhp)

    d_state, (dxs, dhps) = lax.scan(body, d_final, (saved, dys, mask_t), reverse=not reverse)
    rows = hs.reshape(-1, hs.shape[-1])
    dw = dense_ops.weight_grad(rows, dhps.reshape(-1, dhps.shape[-1]), operand_dtype)
    dxs = dhps if dxs is None else dxs
    db_x = None if b_x is None else dxs.sum(axis=(0, 1)).astype(b_x.dtype)
    return (dw.astype(w.dtype), db_x, dhps.sum(axis=(0, 1)).astype(w.dtype), dxs, d_state,
            None)


scan.defvjp(_scan_fwd, _scan_bwd)
