"""Fast-on-CPU formulations of convolution and pooling with the same results as ``lax``.

XLA:CPU runs a convolution fast only in its canonical form (batch-spatial-feature input,
spatial-in-out kernel). Outside loops it rewrites the convolutions that ``jax.grad`` emits into
that form; inside a ``while`` loop (``lax.scan``, so inside ``fit``'s epoch) it does not, and the
weight and input gradients run on a slow generic path: measured 1.3 s against 0.05-0.09 s per
CNN training step. ``conv`` therefore writes both gradients as canonical convolutions itself
(the standard transposed-convolution identities), giving the same numbers. A ``custom_vjp``
has no forward mode, and JAX cannot transpose one inside a custom JVP rule, so ``Conv`` uses it
in training mode only (what ``fit`` differentiates); evaluation mode uses plain ``lax``.

``max_pool_blocks`` is max pooling over non-overlapping windows as a reshape and ``max``, whose
gradient is an elementwise mask instead of ``reduce_window``'s select-and-scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], ...]


def dimension_numbers(ndim: int) -> tuple[str, str, str]:
    """Channels-last input/output and ``(*kernel, in, out)`` kernel for ``ndim`` spatial axes."""
    spatial = "DHW"[3 - ndim:]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads,
         dilation: tuple[int, ...]) -> jax.Array:
    """``lax.conv_general_dilated`` on ``x (N, *spatial, Cin)``, ``w (*kernel, Cin, Cout)``.

    Args:
      strides, dilation: one per spatial axis; pads: explicit ``(low, high)`` per spatial axis.

    Returns:
      ``(N, *out_spatial, Cout)``; reverse-mode gradients are computed by canonical
      convolutions. Being a ``custom_vjp``, it supports reverse mode only.
    """
    return _lax_conv(x, w, strides, pads, dilation)


def _lax_conv(x, w, strides, pads, dilation):
    return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=dimension_numbers(w.ndim - 2))


def _conv_fwd(x, w, strides, pads, dilation):
    return _lax_conv(x, w, strides, pads, dilation), (x, w)


def _conv_bwd(strides, pads, dilation, residuals, g):
    x, w = residuals
    ndim = w.ndim - 2
    numbers = dimension_numbers(ndim)
    dilated = [(k - 1) * d + 1 for k, d in zip(w.shape[:ndim], dilation)]
    # rows of the padded input that the last window does not reach
    unused = [(size + lo + hi - k) % s for size, (lo, hi), k, s in
              zip(x.shape[1:-1], pads, dilated, strides)]
    # input gradient: g dilated by the strides, convolved with the flipped, in/out-swapped kernel
    flipped = jnp.swapaxes(jnp.flip(w, tuple(range(ndim))), -1, -2)
    dx = lax.conv_general_dilated(
        g, flipped, (1,) * ndim,
        [(k - 1 - lo, k - 1 - hi + r) for k, (lo, hi), r in zip(dilated, pads, unused)],
        lhs_dilation=strides, rhs_dilation=dilation, dimension_numbers=numbers)
    # kernel gradient: channels as the batch, examples as the contracted features
    x_t = jnp.moveaxis(x, (0, -1), (-1, 0))  # (Cin, *spatial, N)
    g_t = jnp.moveaxis(g, 0, -2)             # (*out_spatial, N, Cout)
    dw = lax.conv_general_dilated(
        x_t, g_t, dilation, [(lo, hi - r) for (lo, hi), r in zip(pads, unused)],
        rhs_dilation=strides, dimension_numbers=numbers)  # (Cin, *kernel, Cout)
    return dx, jnp.moveaxis(dw, 0, -2)


conv.defvjp(_conv_fwd, _conv_bwd)


def max_pool_blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Max over non-overlapping ``window`` blocks of ``x (N, *spatial, C)``; spatial sizes must
    be multiples of the window. Equals VALID ``reduce_window`` max with strides = window; at exact
    ties the gradient is shared among the tied values instead of given to one of them."""
    n, *spatial, c = x.shape
    blocks = [d for size, w in zip(spatial, window) for d in (size // w, w)]
    y = x.reshape(n, *blocks, c)
    return jnp.max(y, axis=tuple(range(2, 2 * len(window) + 1, 2)))
