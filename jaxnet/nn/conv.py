"""Convolution and pooling over channels-last inputs ``(batch, *spatial, channels)``.

Kernels are laid out ``(*kernel_size, in_channels // groups, features)`` (``HWIO``
in 2-D), the layout XLA's CPU and GPU convolutions prefer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnet._xla import conv_ops
from jaxnet.nn.layer import (Layer, ShapeError, broadcast_trailing, require_example_ndim,
                             require_floating, shape_str, trace_options)
from jaxnet.nn.initializers import check_weight_init, init_weight_and_bias
from jaxnet.nn.basic import check_positive

Padding = str | tuple[tuple[int, int], ...]


def _as_tuple(layer: str, name: str, value, ndim: int) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{layer}: {name} needs {ndim} entries (one per spatial axis), got {value!r}")
    for v in values:
        check_positive(layer, name, v)
    return values


def spatial_kernel(kind: str, kernel_size) -> tuple[str, tuple[int, ...]]:
    """``("Conv2D", (3, 3))`` for ``kind="Conv"`` and ``(3, 3)``: the layer's name for messages
    and the kernel size, checked to hold 1 to 3 positive sizes."""
    if isinstance(kernel_size, (int, np.integer)):
        raise ValueError(f"{kind}: kernel_size needs one size per spatial axis, e.g. (3, 3), got "
                         f"{kernel_size!r}; {kind}1D and {kind}2D also take an int")
    name = f"{kind}{len(tuple(kernel_size))}D"
    kernel = _as_tuple(name, "kernel_size", kernel_size, len(tuple(kernel_size)))
    if len(kernel) not in (1, 2, 3):
        raise ValueError(f"{name}: kernel_size needs 1 to 3 spatial sizes, got {kernel_size!r}")
    return name, kernel


def _as_padding(layer: str, padding, ndim: int) -> Padding:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{layer}: unknown padding {padding!r}; use 'SAME', 'VALID', an int "
                             "or one (low, high) pair per spatial axis")
        return padding.upper()
    if isinstance(padding, (int, np.integer)):
        padding = ((padding, padding),) * ndim
    try:
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        raise ValueError(f"{layer}: unknown padding {padding!r}; use 'SAME', 'VALID', an int "
                         "or one (low, high) pair per spatial axis") from None
    if len(pairs) != ndim or any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise ValueError(f"{layer}: padding needs {ndim} non-negative (low, high) pairs, got {padding!r}")
    return pairs


def _layout(ndim: int) -> str:
    return "(" + ", ".join(["depth", "height", "width"][3 - ndim:] if ndim > 1 else ["length"]) + ", channels)"


def _check_window_fits(what: str, spatial: tuple[int, ...], window: tuple[int, ...],
                       padding: Padding) -> None:
    """A window larger than the (padded) input is a mistake, not an empty output."""
    pads = [(0, 0)] * len(spatial) if padding in ("SAME", "VALID") else padding
    for size, w, (lo, hi) in zip(spatial, window, pads):
        if padding != "SAME" and w > size + lo + hi:
            raise ShapeError(f"{what} {shape_str(window)} is larger than the input's spatial "
                             f"shape {shape_str(spatial)}" + ("" if padding == "VALID" else
                                                              f" padded by {padding}"))


@dataclasses.dataclass(frozen=True, repr=False)
class Conv(Layer):
    """N-d convolution, channels last; use :func:`Conv1D` or :func:`Conv2D` to build one.

    Args:
      features: output channels.
      kernel_size: one size per spatial axis.
      strides: one stride per spatial axis.
      padding: ``"SAME"``, ``"VALID"``, an int, or one ``(low, high)`` pair per axis.
      dilation: kernel dilation per spatial axis.
      feature_group_count: groups; must divide both input channels and ``features``.
      use_bias, weight_init: as in :class:`~jaxnet.Dense`.

    When the caller differentiates in reverse mode only (``apply_with_state(...,
    reverse_only=True)``, as ``train_batch`` and ``fit`` do), an ungrouped convolution computes
    its gradients with canonical convolutions, an order of magnitude faster inside ``lax.scan`` on XLA:CPU (docs/performance.md, finding 2) and
    equal in value. Under the ``"bf16"`` precision policy the convolution runs on bfloat16
    operands with float32 accumulation, and so do both of its gradients when the caller promises
    reverse mode.

    Shapes:
      x: ``(batch, *spatial, in_channels)`` floating;
      ``w: (*kernel_size, in_channels // groups, features)``, ``b: (features,)``;
      y: ``(batch, *out_spatial, features)``.
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | int = 1
    padding: Padding = "SAME"
    dilation: tuple[int, ...] | int = 1
    feature_group_count: int = 1
    use_bias: bool = True
    weight_init: Any = "lecun_normal"
    kind: ClassVar[str] = "conv"

    @property
    def example_ndim(self) -> int:  # type: ignore[override]
        return len(self.kernel_size) + 1

    def __post_init__(self):
        name, kernel = spatial_kernel("Conv", self.kernel_size)
        check_positive(name, "features", self.features)
        ndim = len(kernel)
        object.__setattr__(self, "kernel_size", kernel)
        object.__setattr__(self, "strides", _as_tuple(name, "strides", self.strides, ndim))
        object.__setattr__(self, "dilation", _as_tuple(name, "dilation", self.dilation, ndim))
        object.__setattr__(self, "padding", _as_padding(name, self.padding, ndim))
        check_positive(name, "feature_group_count", self.feature_group_count)
        if self.features % self.feature_group_count:
            raise ValueError(f"{name}: features ({self.features}) must be divisible by "
                             f"feature_group_count ({self.feature_group_count})")
        check_weight_init(name, self.weight_init)

    def _pads(self, x) -> conv_ops.Pads:
        if not isinstance(self.padding, str):
            return self.padding
        dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation)]
        return tuple(map(tuple, lax.padtype_to_pads(x.shape[1:-1], dilated, self.strides, self.padding)))

    def init_params(self, key, x):
        ndim = len(self.kernel_size)
        require_floating(x)
        require_example_ndim(x, ndim + 1, _layout(ndim))
        channels = x.shape[-1]
        if channels % self.feature_group_count:
            raise ShapeError(f"input channels ({channels}) must be divisible by "
                             f"feature_group_count ({self.feature_group_count})")
        dilated = tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation))
        _check_window_fits("kernel (dilated)", x.shape[1:-1], dilated, self.padding)
        in_per_group = channels // self.feature_group_count
        fan_in = in_per_group * math.prod(self.kernel_size)
        w_shape = self.kernel_size + (in_per_group, self.features)
        return init_weight_and_bias(key, self.weight_init, w_shape, fan_in, self.use_bias, x.dtype), {}

    def forward(self, params, state, x, *, train, key):
        options = trace_options()
        if options.reverse_only and self.feature_group_count == 1:  # canonical gradients: _conv_ops
            y = conv_ops.conv(x, params["w"], self.strides, self._pads(x), self.dilation,
                              options.matmul_dtype)
        else:
            y = conv_ops.product(x, params["w"], self.strides, self.padding, self.dilation,
                                 options.matmul_dtype,
                                 feature_group_count=self.feature_group_count)
        if self.use_bias:
            y = y + broadcast_trailing(params["b"], y)
        return y, state

    def flops(self, x_shape, y_shape, params):
        per_output = 2 * math.prod(self.kernel_size) * x_shape[-1] // self.feature_group_count
        return math.prod(y_shape) * per_output


def Conv1D(features: int, kernel_size: int | Sequence[int], **kwargs) -> Conv:
    """1-D convolution over ``(batch, length, channels)``; see :class:`Conv` for the arguments."""
    return Conv(features, _as_tuple("Conv1D", "kernel_size", kernel_size, 1), **kwargs)


def Conv2D(features: int, kernel_size: int | Sequence[int], **kwargs) -> Conv:
    """2-D convolution over ``(batch, height, width, channels)``; see :class:`Conv` for the arguments."""
    return Conv(features, _as_tuple("Conv2D", "kernel_size", kernel_size, 2), **kwargs)


@dataclasses.dataclass(frozen=True, repr=False)
class _Pool(Layer):
    """Shared validation of pooling windows; see :class:`MaxPool` and :class:`AvgPool`."""

    window_shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: Padding = "VALID"

    def __post_init__(self):
        name = type(self).__name__
        window = _as_tuple(name, "window_shape", self.window_shape,
                           1 if isinstance(self.window_shape, (int, np.integer)) else len(tuple(self.window_shape)))
        object.__setattr__(self, "window_shape", window)
        object.__setattr__(self, "strides", window if self.strides is None
                           else _as_tuple(name, "strides", self.strides, len(window)))
        object.__setattr__(self, "padding", _as_padding(name, self.padding, len(window)))

    @property
    def example_ndim(self) -> int:  # type: ignore[override]
        return len(self.window_shape) + 1

    def init_params(self, key, x):
        ndim = len(self.window_shape)
        if not isinstance(self.padding, str) and any(
                lo >= w or hi >= w for (lo, hi), w in zip(self.padding, self.window_shape)):
            raise ShapeError(f"padding {self.padding} is as wide as the window "
                             f"{shape_str(self.window_shape)}: some windows would hold only padding")
        # MaxPool pads with -inf, which has no integer value; AvgPool would silently change dtype.
        require_floating(x)
        require_example_ndim(x, ndim + 1, _layout(ndim))
        _check_window_fits("window", x.shape[1:-1], self.window_shape, self.padding)
        return {}, {}

    def _blocks(self, x, train: bool) -> jax.Array | None:
        """``x`` cut into its non-overlapping windows, ``(batch, out_1, window_1, out_2, window_2,
        ..., channels)``, in training mode when the windows tile the input (VALID padding,
        strides equal to the window): a reshape, whose reductions have elementwise gradients
        where ``reduce_window``'s max gradient is a slow select-and-scatter. ``None`` otherwise:
        in evaluation mode ``reduce_window``'s forward pass is as fast, and with the reshape
        XLA:CPU fuses a whole CNN's forward pass into one YNNPACK graph that runs slower (docs/performance.md, finding 3)."""
        if not (train or trace_options().reverse_only):
            return None
        no_padding = self.padding == "VALID" or (
            not isinstance(self.padding, str) and not any(map(any, self.padding)))
        if not no_padding or self.strides != self.window_shape:
            return None
        n, *spatial, c = x.shape
        kept = tuple(size - size % w for size, w in zip(spatial, self.window_shape))
        x = x[(slice(None),) + tuple(slice(k) for k in kept)]  # VALID drops the remainder
        return x.reshape(n, *(d for k, w in zip(kept, self.window_shape) for d in (k // w, w)), c)

    def _reduce(self, x, init, op):
        dims = (1,) + self.window_shape + (1,)
        strides = (1,) + self.strides + (1,)
        padding = self.padding if isinstance(self.padding, str) else ((0, 0),) + self.padding + ((0, 0),)
        return lax.reduce_window(x, init, op, dims, strides, padding)

    def flops(self, x_shape, y_shape, params):
        return math.prod(y_shape) * math.prod(self.window_shape)


@dataclasses.dataclass(frozen=True, repr=False)
class MaxPool(_Pool):
    """Max over windows of each channel.

    Args:
      window_shape: window per spatial axis, e.g. ``(2, 2)``.
      strides: defaults to ``window_shape``.
      padding: ``"VALID"`` (default), ``"SAME"`` or ``(low, high)`` pairs; padding never wins the max.

    Shapes: x ``(batch, *spatial, channels)`` -> y ``(batch, *out_spatial, channels)``.

    Known limitation: on CPU, with windows that tile the input, a NaN in a window is dropped
    (the window's largest number is returned), because XLA:CPU's max reductions skip NaN
    (docs/performance.md, finding 22).
    """

    kind: ClassVar[str] = "max_pool"

    def forward(self, params, state, x, *, train, key):
        blocks = self._blocks(x, train)
        if blocks is not None:  # the same derivative as reduce_window's, cheaper (see window_max)
            return conv_ops.window_max(blocks), state
        # A NumPy scalar, not jnp.array: under jit the latter is a tracer, and reduce_window with a
        # traced init value falls back to a generic reduction that cannot be differentiated.
        return self._reduce(x, x.dtype.type(-jnp.inf), lax.max), state


@dataclasses.dataclass(frozen=True, repr=False)
class AvgPool(_Pool):
    """Mean over windows of each channel; with padding, the mean of the real (unpadded) values.

    Arguments and shapes as in :class:`MaxPool`.
    """

    kind: ClassVar[str] = "avg_pool"

    def forward(self, params, state, x, *, train, key):
        blocks = self._blocks(x, train)
        if blocks is not None:
            return jnp.mean(blocks, axis=conv_ops.window_axes(blocks)), state
        zero = x.dtype.type(0)  # concrete, see MaxPool
        sums = self._reduce(x, zero, lax.add)
        if self.padding == "VALID":
            return sums / math.prod(self.window_shape), state
        counts = self._reduce(jnp.ones((1,) + x.shape[1:-1] + (1,), x.dtype), zero, lax.add)
        return sums / counts, state
