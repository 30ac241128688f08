"""Global pooling: one value per channel from all spatial positions of ``(batch, *spatial, channels)``.

The usual bridge from convolutional features to a classifier head, independent of the image size.
These layers take any number of spatial axes, so they do not declare an example rank: in a
network a layer before them that declares one (a convolution) fixes it; alone, an input
``(a, b, c)`` is read as a batch of ``a`` examples ``(b, c)``; after only pointwise layers
(``Dense``) the reading is ambiguous and ``apply`` asks for ``batch_ndim=``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from jaxnet._xla import nan_max
from jaxnet.nn.layer import Layer, ShapeError, require_floating, shape_str


@dataclasses.dataclass(frozen=True, repr=False)
class _GlobalPool(Layer):
    """Shared validation and axes; see :class:`GlobalAvgPool` and :class:`GlobalMaxPool`."""

    keepdims: bool = False

    def __post_init__(self):
        if not isinstance(self.keepdims, bool):
            raise TypeError(f"{type(self).__name__}: keepdims must be True or False, got {self.keepdims!r}")

    def init_params(self, key, x):
        # Pooling a rank-1 example (channels,) would pool over nothing: a mistake, not an identity.
        if x.ndim < 3:
            raise ShapeError(f"expected examples of shape (*spatial, channels) with at least one spatial "
                             f"axis; got examples of shape {shape_str(x.shape[1:])} (rank {x.ndim - 1})")
        return {}, {}

    @staticmethod
    def _axes(x) -> tuple[int, ...]:
        return tuple(range(1, x.ndim - 1))

    def flops(self, x_shape, y_shape, params):
        """One per input value (an add or a comparison)."""
        return math.prod(x_shape)


@dataclasses.dataclass(frozen=True, repr=False)
class GlobalAvgPool(_GlobalPool):
    """Mean of each channel over all spatial positions.

    Args:
      keepdims: keep the spatial axes, with size 1.

    Shapes:
      x: ``(batch, *spatial, channels)`` floating, at least one spatial axis; no params;
      y: ``(batch, channels)``, or ``(batch, 1, ..., 1, channels)`` with ``keepdims``, in x's dtype.
    """

    kind: ClassVar[str] = "global_avg_pool"

    def init_params(self, key, x):
        require_floating(x)  # the mean of integers is not an integer: no silent dtype change
        return super().init_params(key, x)

    def forward(self, params, state, x, *, train, key):
        return jnp.mean(x, axis=self._axes(x), keepdims=self.keepdims), state


@dataclasses.dataclass(frozen=True, repr=False)
class GlobalMaxPool(_GlobalPool):
    """Maximum of each channel over all spatial positions.

    Its gradient goes to the maximal position (split equally between exact ties). A NaN input
    makes its channel's maximum NaN, as in NumPy and PyTorch, on every backend (XLA:CPU's own
    max reduction drops NaN: ``jaxnet._xla.nan_max``), and takes that channel's gradient.

    Args:
      keepdims: keep the spatial axes, with size 1.

    Shapes:
      x: ``(batch, *spatial, channels)`` of any real dtype, at least one spatial axis; no params;
      y: ``(batch, channels)``, or ``(batch, 1, ..., 1, channels)`` with ``keepdims``, in x's dtype.
    """

    kind: ClassVar[str] = "global_max_pool"

    def forward(self, params, state, x, *, train, key):
        return nan_max.max_over(x, self._axes(x), self.keepdims), state
