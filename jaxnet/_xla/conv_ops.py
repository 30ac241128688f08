"""Fast-on-CPU formulations of convolution and pooling with the same results as ``lax``.

XLA:CPU runs a convolution fast only in its canonical form (batch-spatial-feature input,
spatial-in-out kernel). Outside loops it rewrites the convolutions that ``jax.grad`` emits into
that form; inside a ``while`` loop (``lax.scan``, so inside ``fit``'s epoch) it does not, and the
weight and input gradients run on a generic path that is an order of magnitude slower
(docs/performance.md, finding 2). ``conv`` therefore writes both gradients as canonical
convolutions itself (the standard transposed-convolution identities), giving the same numbers;
an input dilation (``ConvTranspose``) is handled by the same identities. With an
``operand_dtype`` (bfloat16 under the ``"bf16"`` precision policy) the convolution and both of
its gradients round their operands to it and accumulate in float32 (``jaxnet._xla.mixed``).
A ``custom_vjp`` has no forward mode, and JAX cannot transpose one inside a custom JVP rule, so
``Conv`` and ``ConvTranspose`` use it only when the caller promises reverse mode
(``reverse_only=True``, as ``fit`` does) and :func:`product` (plain ``lax``) otherwise.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxnet._xla import mixed

Pads = tuple[tuple[int, int], ...]


def dimension_numbers(ndim: int) -> tuple[str, str, str]:
    """Channels-last input/output and ``(*kernel, in, out)`` kernel for ``ndim`` spatial axes."""
    spatial = "DHW"[3 - ndim:]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads,
         dilation: tuple[int, ...], operand_dtype=None,
         lhs_dilation: tuple[int, ...] | None = None) -> jax.Array:
    """``lax.conv_general_dilated`` on ``x (N, *spatial, Cin)``, ``w (*kernel, Cin, Cout)``.

    Args:
      strides, dilation: one per spatial axis; pads: explicit ``(low, high)`` per spatial axis
        (negative: cropped).
      operand_dtype: when not ``None`` (bfloat16), the convolution and both gradient
        convolutions round their operands to it and accumulate in float32 (``mixed``).
      lhs_dilation: the input's dilation per spatial axis (``ConvTranspose``'s strides);
        ``None``: none.

    Returns:
      ``(N, *out_spatial, Cout)`` in ``x``'s dtype; reverse-mode gradients are computed by
      canonical convolutions. Being a ``custom_vjp``, it supports reverse mode only.
    """
    return mixed.product(_geometry(strides, pads, dilation, lhs_dilation), x, w,
                         operand_dtype).astype(jnp.result_type(x, w))


def _lax_conv(x, w, strides, pads, dilation, preferred_element_type=None, lhs_dilation=None,
              feature_group_count=1):
    """Channels-last ``lax.conv_general_dilated``; ``pads`` a string or ``(low, high)`` pairs."""
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation,
                                    rhs_dilation=dilation,
                                    dimension_numbers=dimension_numbers(w.ndim - 2),
                                    feature_group_count=feature_group_count,
                                    preferred_element_type=preferred_element_type)


def _geometry(strides, pads, dilation, lhs_dilation=None,
              feature_group_count=1) -> mixed.Product:
    """The convolution ``(x, w, preferred_element_type) -> y`` with this geometry."""
    return lambda x, w, preferred: _lax_conv(x, w, strides, pads, dilation, preferred,
                                             lhs_dilation, feature_group_count)


def product(x: jax.Array, w: jax.Array, strides: tuple[int, ...], padding,
            dilation: tuple[int, ...], operand_dtype=None, *,
            lhs_dilation: tuple[int, ...] | None = None,
            feature_group_count: int = 1) -> jax.Array:
    """``lax.conv_general_dilated`` (channels last, ``padding`` a string or pairs), differentiable
    in every mode; with ``operand_dtype``, on rounded operands accumulated in float32, with the
    derivatives of the float32 convolution of the rounded values (``mixed.straight_through``)."""
    op = _geometry(strides, padding, dilation, lhs_dilation, feature_group_count)
    if operand_dtype is None:
        return op(x, w, None)
    return mixed.straight_through(op, x, w, operand_dtype)


def _conv_fwd(x, w, strides, pads, dilation, operand_dtype, lhs_dilation):
    return conv(x, w, strides, pads, dilation, operand_dtype, lhs_dilation), (x, w)


def _conv_bwd(strides, pads, dilation, operand_dtype, lhs_dilation, residuals, g):
    """JAX's transposes of a convolution (``lax``'s conv VJP rules), written as canonical
    convolutions: the input dilation becomes the input gradient's window strides and the kernel
    gradient's input dilation."""
    x, w = residuals  # the unrounded operands: the gradients take their dtypes
    ndim = w.ndim - 2
    lhs_dilation = lhs_dilation or (1,) * ndim
    dilated = [(k - 1) * d + 1 for k, d in zip(w.shape[:ndim], dilation)]
    # rows of the padded (dilated) input that the last window does not reach
    unused = [((size - 1) * ld + 1 + lo + hi - k) % s for size, ld, (lo, hi), k, s in
              zip(x.shape[1:-1], lhs_dilation, pads, dilated, strides)]
    # input gradient: g dilated by the strides, convolved with the flipped, in/out-swapped kernel
    flipped = jnp.swapaxes(jnp.flip(w, tuple(range(ndim))), -1, -2)
    input_grad = _geometry(lhs_dilation, [(k - 1 - lo, k - 1 - hi + r) for k, (lo, hi), r in
                                          zip(dilated, pads, unused)], dilation, strides)
    dx = mixed.product(input_grad, g, flipped, operand_dtype)
    # kernel gradient: channels as the batch, examples as the contracted features
    weight_grad = functools.partial(
        _weight_grad, dilation=dilation, operand_dtype=operand_dtype,
        pads=[(lo, hi - r) for (lo, hi), r in zip(pads, unused)], strides=strides,
        lhs_dilation=lhs_dilation)
    chunked = lambda x, g: sum(weight_grad(x[rows], g[rows]) for rows in example_chunks(
        x.shape[0], math.prod(g.shape[1:-1]), CHUNK_POSITIONS))
    dw = lax.platform_dependent(x, g, cpu=chunked, default=weight_grad)
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _weight_grad(x, g, *, dilation, pads, strides, lhs_dilation, operand_dtype):
    """``(*kernel, Cin, Cout)`` gradient of the kernel from ``x (N, *spatial, Cin)`` and the
    output gradient ``g (N, *out_spatial, Cout)``, as one canonical convolution (in float32
    when ``operand_dtype`` rounds the operands)."""
    x_t = jnp.moveaxis(mixed.rounded(x, operand_dtype), (0, -1), (-1, 0))  # (Cin, *spatial, N)
    g_t = jnp.moveaxis(mixed.rounded(g, operand_dtype), 0, -2)             # (*out_spatial, N, Cout)
    dw = mixed.product(_geometry(dilation, pads, strides, lhs_dilation), x_t, g_t,
                       operand_dtype)  # (Cin, *kernel, Cout)
    return jnp.moveaxis(dw, 0, -2)


# XLA:CPU's YNNPACK path runs the kernel-gradient convolution fastest when each call contracts
# ~2,000 output positions (examples x out_spatial), faster than one call over a whole batch of
# small images (docs/performance.md, findings 5 and 9).
CHUNK_POSITIONS = 2048
MAX_CHUNKS = 16


def example_chunks(n: int, per_example: int, budget: int) -> list[slice]:
    """Slices of ``range(n)`` with ``round(budget / per_example)`` examples each (at least one),
    at most ``MAX_CHUNKS`` of them; the last may be shorter."""
    size = max(-(-n // MAX_CHUNKS), round(budget / per_example), 1)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


conv.defvjp(_conv_fwd, _conv_bwd)


@jax.custom_jvp
def window_max(blocks: jax.Array) -> jax.Array:
    """Max over the window axes of ``blocks (N, out_1, window_1, ..., out_d, window_d, C)``.

    The derivative goes to the first maximum of each window in row-major window order, exactly
    as ``lax.reduce_window``'s (its select-and-scatter keeps the first of equal values); where
    the window's max is NaN, to its first NaN. Unlike ``jnp.max``, whose gradient splits ties
    (common after ReLU, where a window of zeros ties), and unlike select-and-scatter, the
    gradient is one elementwise select with the saved first-max mask: XLA:CPU fuses it into the
    ReLU's gradient (docs/performance.md, finding 10). Forward mode works too (a custom JVP).

    Returns:
      ``(N, out_1, ..., out_d, C)``.
    """
    return jnp.max(blocks, axis=window_axes(blocks))


def window_axes(blocks: jax.Array) -> tuple[int, ...]:
    """The window axes of ``blocks (N, out_1, window_1, ..., out_d, window_d, C)``."""
    return tuple(range(2, blocks.ndim - 1, 2))


@window_max.defjvp
def _window_max_jvp(primals, tangents):
    (blocks,), (t,) = primals, tangents
    axes = window_axes(blocks)
    y = jnp.max(blocks, axis=axes)
    mask = _first_max_mask(blocks, y)
    return y, jnp.sum(jnp.where(mask, t, jnp.zeros_like(t)), axis=axes)


def _first_max_mask(blocks: jax.Array, y: jax.Array) -> jax.Array:
    """``blocks``-shaped bool: true at the first element of each window equal to its max."""
    windows = [blocks.shape[a] for a in window_axes(blocks)]
    positions = list(itertools.product(*map(range, windows)))
    earlier = None  # an earlier element of the window holds the max
    hits = {}
    for position in positions:  # row-major window order
        index = [slice(None)] * blocks.ndim
        for axis, i in zip(window_axes(blocks), position):
            index[axis] = i
        value = blocks[tuple(index)]
        hit = (value == y) | (jnp.isnan(value) & jnp.isnan(y))
        hits[position] = hit if earlier is None else hit & ~earlier
        earlier = hit if earlier is None else earlier | hit
    return _interleave(hits, windows, ())


def _interleave(parts: dict, windows: list[int], prefix: tuple[int, ...]) -> jax.Array:
    """Stacks ``parts[(i_1, ..., i_d)] (N, out_1, ..., out_d, C)`` into ``(N, out_1, window_1,
    ..., out_d, window_d, C)``: window axis ``a`` goes in after ``out_a``."""
    a = len(prefix)
    if a == len(windows):
        return parts[prefix]
    return jnp.stack([_interleave(parts, windows, prefix + (i,)) for i in range(windows[a])],
                     axis=2 + a)  # after out_a: the deeper window axes are already in
