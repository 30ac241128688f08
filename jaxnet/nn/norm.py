"""Normalisation: LayerNorm, RMSNorm, GroupNorm (per example); BatchNorm (batch statistics, running state)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax import lax

from jaxnet.nn.layer import (Layer, ShapeError, broadcast_trailing, require_feature_axis,
                             require_floating)


def statistics_dtype(dtype):
    """The dtype normalisation statistics are computed in: at least float32.

    bfloat16 (8 significant bits) and float16 (11) round a mean or variance, and ``x - mean``,
    too coarsely; a bfloat16 network normalises in float32 and rounds the result once.
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def _scale_and_bias(x, use_scale: bool, use_bias: bool) -> dict:
    features = x.shape[-1]
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((features,), x.dtype)
    if use_bias:
        params["bias"] = jnp.zeros((features,), x.dtype)
    return params


def _normalise(x, mean, var, params, epsilon):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias``; statistics of shape ``(features,)`` or keepdims.

    Computed in ``x``'s dtype (the statistics' dtype); scale and bias are cast to it (a no-op
    unless a bfloat16 network normalises in float32).
    """
    y = (x - broadcast_trailing(mean, x)) * broadcast_trailing(lax.rsqrt(var + epsilon), x)
    if "scale" in params:
        y = y * broadcast_trailing(params["scale"].astype(x.dtype), x)
    if "bias" in params:
        y = y + broadcast_trailing(params["bias"].astype(x.dtype), x)
    return y


@dataclasses.dataclass(frozen=True, repr=False)
class LayerNorm(Layer):
    """Normalises each position over its last axis, then scales and shifts.

    Shapes: x ``(batch, ..., features)`` floating -> same shape and dtype;
    params ``scale``, ``bias``: ``(features,)``. Statistics and normalisation are computed in
    float32 for bfloat16 and float16 inputs, and the result rounded once.
    """

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    kind: ClassVar[str] = "layer_norm"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        if not self.epsilon > 0:
            raise ValueError(f"LayerNorm: epsilon must be positive, got {self.epsilon!r}")

    def init_params(self, key, x):
        require_floating(x)
        require_feature_axis(x)
        return _scale_and_bias(x, self.use_scale, self.use_bias), {}

    def forward(self, params, state, x, *, train, key):
        xs = x.astype(statistics_dtype(x.dtype))
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        var = jnp.var(xs, axis=-1, keepdims=True)
        return _normalise(xs, mean, var, params, self.epsilon).astype(x.dtype), state


@dataclasses.dataclass(frozen=True, repr=False)
class BatchNorm(Layer):
    """Normalises each channel (last axis) with statistics over the batch and all other axes.

    In training mode it uses the batch's statistics and returns updated running
    averages ``new = momentum * old + (1 - momentum) * batch``; in evaluation mode it
    uses the running averages. Use ``init_with_state`` / ``apply_with_state``.

    Args:
      momentum: weight of the old running average, in ``[0, 1)``.
      epsilon: added to the variance.
      axis_name: a ``jax.vmap``/``shard_map`` axis name to average statistics over,
        needed when examples are mapped one at a time (e.g. ``vmap(..., axis_name="batch")``).

    Shapes: x ``(batch, ..., channels)`` -> same shape and dtype; params ``scale``, ``bias``:
    ``(channels,)`` in x's dtype; state ``mean``, ``var``: ``(channels,)`` in x's dtype, but at
    least float32 (a bfloat16 network keeps float32 running statistics and computes its
    statistics and normalisation in float32).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    kind: ClassVar[str] = "batch_norm"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        if not 0 <= self.momentum < 1:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1), got {self.momentum!r}")
        if not self.epsilon > 0:
            raise ValueError(f"BatchNorm: epsilon must be positive, got {self.epsilon!r}")

    @property
    def has_state(self):
        return True

    def init_params(self, key, x):
        require_floating(x)
        require_feature_axis(x)
        features = x.shape[-1]
        dtype = statistics_dtype(x.dtype)
        state = {"mean": jnp.zeros((features,), dtype), "var": jnp.ones((features,), dtype)}
        return _scale_and_bias(x, self.use_scale, self.use_bias), state

    def forward(self, params, state, x, *, train, key):
        xs = x.astype(statistics_dtype(x.dtype))
        if not train:
            y = _normalise(xs, state["mean"], state["var"], params, self.epsilon)
            return y.astype(x.dtype), state
        axes = tuple(range(x.ndim - 1))
        if self.axis_name is None:
            mean, var = jnp.mean(xs, axes), jnp.var(xs, axes)
        else:  # statistics over examples mapped one at a time
            mean, mean_of_squares = lax.pmean((jnp.mean(xs, axes), jnp.mean(jnp.square(xs), axes)),
                                              self.axis_name)
            var = jnp.maximum(mean_of_squares - jnp.square(mean), 0)
        new_state = {name: self.momentum * state[name] + (1 - self.momentum) * lax.stop_gradient(batch)
                     for name, batch in (("mean", mean), ("var", var))}
        return _normalise(xs, mean, var, params, self.epsilon).astype(x.dtype), new_state


def _check_epsilon(layer: str, epsilon) -> None:
    if not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"{layer}: epsilon must be a positive number, got {epsilon!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class RMSNorm(Layer):
    """Scales each position by the reciprocal root mean square of its last axis: no centring, no bias.

    ``y = x / sqrt(mean(x**2, axis=-1) + epsilon) * scale``.

    Args:
      epsilon: added to the mean square.
      use_scale: multiply by the learned ``scale``.

    Shapes:
      x: ``(batch, ..., features)`` floating -> same shape and dtype; params ``scale:
      (features,)`` in x's dtype. Computed in float32 for bfloat16 and float16 inputs, the
      result rounded once.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    kind: ClassVar[str] = "rms_norm"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        _check_epsilon("RMSNorm", self.epsilon)

    def init_params(self, key, x):
        require_floating(x)
        require_feature_axis(x)
        return _scale_and_bias(x, self.use_scale, False), {}

    def forward(self, params, state, x, *, train, key):
        xs = x.astype(statistics_dtype(x.dtype))
        mean_square = jnp.mean(jnp.square(xs), axis=-1, keepdims=True)
        y = xs * lax.rsqrt(mean_square + self.epsilon)
        if "scale" in params:
            y = y * broadcast_trailing(params["scale"].astype(y.dtype), y)
        return y.astype(x.dtype), state


@dataclasses.dataclass(frozen=True, repr=False)
class GroupNorm(Layer):
    """Normalises each example over groups of channels and all its other axes, then scales and shifts.

    Channels (the last axis) are split into ``num_groups`` consecutive groups; each group of
    each example is normalised with its mean and variance over the group's channels and every
    spatial position. ``num_groups=1`` normalises whole examples (LayerNorm over all axes);
    ``num_groups=channels`` is instance normalisation. Statistics never mix examples.

    The example rank is not fixed (``(channels,)``, ``(length, channels)``, ``(h, w, channels)``):
    inside a network with convolutions it follows from them; alone, pass ``batch_ndim=1`` to
    ``apply``.

    Args:
      num_groups: number of channel groups; must divide the channels.
      epsilon: added to the variance.
      use_scale, use_bias: the learned per-channel ``scale`` and ``bias``.

    Shapes:
      x: ``(batch, *spatial, channels)`` floating -> same shape and dtype; params ``scale``,
      ``bias``: ``(channels,)`` in x's dtype. Computed in float32 for bfloat16 and float16 inputs.
    """

    num_groups: int
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    kind: ClassVar[str] = "group_norm"

    def __post_init__(self):
        if (isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int)
                or self.num_groups <= 0):
            raise ValueError(f"GroupNorm: num_groups must be a positive integer, got {self.num_groups!r}")
        _check_epsilon("GroupNorm", self.epsilon)

    def init_params(self, key, x):
        require_floating(x)
        require_feature_axis(x)
        if x.shape[-1] % self.num_groups:
            raise ShapeError(f"num_groups={self.num_groups} must divide the {x.shape[-1]} channels "
                             f"(last axis of examples of shape {tuple(x.shape[1:])})")
        return _scale_and_bias(x, self.use_scale, self.use_bias), {}

    def forward(self, params, state, x, *, train, key):
        xs = x.astype(statistics_dtype(x.dtype))
        channels = x.shape[-1]
        grouped = xs.reshape(x.shape[:-1] + (self.num_groups, channels // self.num_groups))
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)  # spatial and in-group
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.var(grouped, axis=axes, keepdims=True)
        y = ((grouped - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if "scale" in params:
            y = y * broadcast_trailing(params["scale"].astype(y.dtype), y)
        if "bias" in params:
            y = y + broadcast_trailing(params["bias"].astype(y.dtype), y)
        return y.astype(x.dtype), state
