"""Layers that enlarge channels-last inputs ``(batch, *spatial, channels)``: ConvTranspose and Upsample.

Both are the decoder's counterparts of :class:`~jaxnet.Conv` with ``strides > 1`` and of pooling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import numpy as np

from jaxnet._xla import conv_ops
from jaxnet.nn.basic import check_positive
from jaxnet.nn.conv import Padding, _as_padding, _as_tuple, _layout, spatial_kernel
from jaxnet.nn.initializers import check_weight_init, init_weight_and_bias
from jaxnet.nn.layer import (Layer, ShapeError, broadcast_trailing, require_example_ndim,
                             require_floating, shape_str, trace_options)


@dataclasses.dataclass(frozen=True, repr=False)
class ConvTranspose(Layer):
    """N-d transposed convolution, channels last; use :func:`ConvTranspose1D` or :func:`ConvTranspose2D`.

    Each input position scatters ``x[i] @ w[k]`` to output position ``i * stride + k`` (then the
    padding crops the result): the gradient of :class:`~jaxnet.Conv` with respect to its input,
    and the same computation as ``torch.nn.ConvTranspose{1,2,3}d``. A torch weight
    ``(in, out, *kernel)`` is this layer's ``w`` after moving its first two axes last
    (``weight.permute(2, 3, 0, 1)`` in 2-D), with no spatial flip.

    Output size per spatial axis, for input size ``n``, stride ``s`` and kernel size ``k``:

    * ``"SAME"`` (default): ``n * s``. It is the exact transpose of a ``"SAME"`` :class:`Conv`
      with the same kernel and strides on inputs of size ``n * s``, and equals
      ``jax.lax.conv_transpose(x, swapaxes(w, -1, -2), strides, "SAME", transpose_kernel=True)``:
      ``k - s`` edge positions are cropped, the odd one at the end; when ``k < s`` the last
      ``s - k`` positions receive no input and hold the bias only.
    * ``"VALID"``: ``(n - 1) * s + k``, every position some input reaches (torch ``padding=0``).
    * an int ``p`` or ``(low, high)`` pairs: ``(n - 1) * s + k - low - high``, that many positions
      cropped from each end of the ``"VALID"`` output. torch's ``padding=p, output_padding=q``
      is ``((p, p - q), ...)`` for ``q <= p``; ``q > p`` (positions beyond the ``"VALID"``
      output, holding only the bias) is not supported.

    When the caller promises reverse mode (``reverse_only=True``, as ``fit`` does) its gradients
    are canonical convolutions (``jaxnet/_xla/conv_ops.py``), equal in value to ``lax``'s. Under
    the ``"bf16"`` precision policy its convolutions run on bfloat16 operands with float32
    accumulation, as :class:`~jaxnet.Conv`'s.

    Args:
      features: output channels.
      kernel_size: one size per spatial axis (1 to 3 axes).
      strides: one stride per spatial axis, the upsampling factor.
      padding: ``"SAME"``, ``"VALID"``, an int, or one ``(low, high)`` crop per axis, as above.
      use_bias: add the bias ``b``.
      weight_init: as in :class:`~jaxnet.Dense`, with fans computed from the ``(*kernel_size,
        in_channels, features)`` layout; ``"pytorch"`` reproduces ``torch.nn.ConvTranspose``'s
        default, whose fan-in counts output channels: weights and biases uniform in
        ``±1/sqrt(features * prod(kernel_size))``.

    Shapes:
      x: ``(batch, *spatial, in_channels)`` floating;
      params ``w: (*kernel_size, in_channels, features)``, ``b: (features,)`` in x's dtype;
      y: ``(batch, *out_spatial, features)`` in x's dtype, ``out_spatial`` as above.
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | int = 1
    padding: Padding = "SAME"
    use_bias: bool = True
    weight_init: Any = "lecun_normal"
    kind: ClassVar[str] = "conv_transpose"

    def __post_init__(self):
        name, kernel = spatial_kernel("ConvTranspose", self.kernel_size)
        check_positive(name, "features", self.features)
        ndim = len(kernel)
        object.__setattr__(self, "kernel_size", kernel)
        object.__setattr__(self, "strides", _as_tuple(name, "strides", self.strides, ndim))
        object.__setattr__(self, "padding", _as_padding(name, self.padding, ndim))
        check_weight_init(name, self.weight_init)

    @property
    def example_ndim(self) -> int:  # type: ignore[override]
        """``(*spatial, channels)``: one axis per kernel axis, plus channels."""
        return len(self.kernel_size) + 1

    def crops(self) -> tuple[tuple[int, int], ...]:
        """Positions cropped from each end of the ``"VALID"`` output, per axis (negative: added)."""
        if self.padding == "VALID":
            return ((0, 0),) * len(self.kernel_size)
        if self.padding == "SAME":
            # Transpose of Conv's SAME, which pads max(k - s, 0) in total, the odd one at the end.
            lows = [max(k - s, 0) // 2 for k, s in zip(self.kernel_size, self.strides)]
            return tuple((lo, k - s - lo) for lo, k, s in zip(lows, self.kernel_size, self.strides))
        return self.padding

    def output_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The output's spatial shape for an input's, as documented above."""
        return tuple((n - 1) * s + k - lo - hi for n, s, k, (lo, hi)
                     in zip(spatial, self.strides, self.kernel_size, self.crops()))

    def init_params(self, key, x):
        ndim = len(self.kernel_size)
        require_floating(x)
        require_example_ndim(x, ndim + 1, _layout(ndim))
        out = self.output_spatial(x.shape[1:-1])
        if min(out) < 1:
            raise ShapeError(f"padding {self.padding} crops the whole output: inputs of spatial shape "
                             f"{shape_str(x.shape[1:-1])} give an output of spatial shape {shape_str(out)}")
        channels = x.shape[-1]
        w_shape = self.kernel_size + (channels, self.features)
        if self.weight_init != "pytorch":
            fan_in = channels * math.prod(self.kernel_size)
            return init_weight_and_bias(key, self.weight_init, w_shape, fan_in, self.use_bias, x.dtype), {}
        bound = 1 / math.sqrt(self.features * math.prod(self.kernel_size))
        w_key, b_key = jax.random.split(key)
        params = {"w": jax.random.uniform(w_key, w_shape, x.dtype, -bound, bound)}
        if self.use_bias:
            params["b"] = jax.random.uniform(b_key, (self.features,), x.dtype, -bound, bound)
        return params, {}

    def forward(self, params, state, x, *, train, key):
        # A convolution of the input dilated by the strides with the spatially flipped kernel:
        # padding k - 1 on both sides gives the VALID output, and crops shrink that padding
        # (negative padding crops further; lax accepts it).
        ndim = len(self.kernel_size)
        w = params["w"][(slice(None, None, -1),) * ndim]
        pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(self.kernel_size, self.crops()))
        options = trace_options()
        if options.reverse_only:  # gradients as canonical convolutions (conv_ops)
            y = conv_ops.conv(x, w, (1,) * ndim, pads, (1,) * ndim, options.matmul_dtype,
                              self.strides)
        else:
            y = conv_ops.product(x, w, (1,) * ndim, pads, (1,) * ndim, options.matmul_dtype,
                                 lhs_dilation=self.strides)
        if self.use_bias:
            y = y + broadcast_trailing(params["b"], y)
        return y, state

    def flops(self, x_shape, y_shape, params):
        """Two per product of an input value and a kernel weight (the zeros of the dilated input are free)."""
        per_input = 2 * math.prod(self.kernel_size) * self.features
        return math.prod(x_shape) * per_input + (math.prod(y_shape) if self.use_bias else 0)


def ConvTranspose1D(features: int, kernel_size: int | Sequence[int], **kwargs) -> ConvTranspose:
    """1-D transposed convolution over ``(batch, length, channels)``; see :class:`ConvTranspose`."""
    return ConvTranspose(features, _as_tuple("ConvTranspose1D", "kernel_size", kernel_size, 1), **kwargs)


def ConvTranspose2D(features: int, kernel_size: int | Sequence[int], **kwargs) -> ConvTranspose:
    """2-D transposed convolution over ``(batch, height, width, channels)``; see :class:`ConvTranspose`."""
    return ConvTranspose(features, _as_tuple("ConvTranspose2D", "kernel_size", kernel_size, 2), **kwargs)


_METHODS = {"nearest": "nearest", "bilinear": "linear"}


@dataclasses.dataclass(frozen=True, repr=False)
class Upsample(Layer):
    """Enlarges each spatial axis by an integer factor, with ``jax.image.resize``.

    ``"nearest"`` repeats each value ``scale`` times along each axis (``np.repeat``).
    ``"bilinear"`` (linear in 1-D, trilinear in 3-D) interpolates with half-pixel centres and
    clamped edges, the values of ``torch.nn.functional.interpolate(..., mode="bilinear",
    align_corners=False)``. Antialiasing only changes downsampling, which integer factors never
    do, so it is off.

    Args:
      scale: a positive int for every spatial axis, or one per spatial axis, e.g. ``(2, 1)``.
        A tuple also fixes the example rank (``example_ndim = len(scale) + 1``); with an int the
        number of spatial axes comes from the input (the layers before, or the batch axes).
      method: ``"nearest"`` (default) or ``"bilinear"``.

    Shapes:
      x: ``(batch, *spatial, channels)``, at least one spatial axis; floating for
      ``"bilinear"``, any dtype for ``"nearest"``; no params;
      y: ``(batch, *(spatial * scale), channels)`` in x's dtype.
    """

    scale: int | tuple[int, ...]
    method: str = "nearest"
    kind: ClassVar[str] = "upsample"

    def __post_init__(self):
        if isinstance(self.scale, (int, np.integer)):
            check_positive("Upsample", "scale", self.scale)
            object.__setattr__(self, "scale", int(self.scale))
        else:
            if not isinstance(self.scale, (tuple, list)) or not self.scale:
                raise ValueError(f"Upsample: scale must be a positive integer or one per spatial axis, "
                                 f"got {self.scale!r}")
            object.__setattr__(self, "scale", _as_tuple("Upsample", "scale", self.scale, len(self.scale)))
        if self.method not in _METHODS:
            raise ValueError(f"Upsample: unknown method {self.method!r}; use 'nearest' or 'bilinear'")

    @property
    def example_ndim(self) -> int | None:  # type: ignore[override]
        """``len(scale) + 1`` for a per-axis scale; ``None`` (not declared) for an int scale."""
        return None if isinstance(self.scale, int) else len(self.scale) + 1

    def _scales(self, x) -> tuple[int, ...]:
        return (self.scale,) * (x.ndim - 2) if isinstance(self.scale, int) else self.scale

    def init_params(self, key, x):
        if self.method == "bilinear":
            require_floating(x)
        if isinstance(self.scale, int):
            if x.ndim < 3:
                raise ShapeError(f"expected examples of shape (*spatial, channels) with at least one "
                                 f"spatial axis; got examples of shape {shape_str(x.shape[1:])} "
                                 f"(rank {x.ndim - 1})")
        else:
            ndim = len(self.scale)
            require_example_ndim(x, ndim + 1, _layout(ndim) if ndim <= 3 else "(*spatial, channels)")
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        scales = self._scales(x)
        if all(s == 1 for s in scales):
            return x, state
        shape = (x.shape[0],) + tuple(n * s for n, s in zip(x.shape[1:-1], scales)) + x.shape[-1:]
        return jax.image.resize(x, shape, _METHODS[self.method], antialias=False), state

    def flops(self, x_shape, y_shape, params):
        """Nearest copies values (0); (bi)linear weighs ``2 ** d`` neighbours per output value."""
        if self.method == "nearest":
            return 0
        return math.prod(y_shape) * 2 * 2 ** (len(y_shape) - 2)
