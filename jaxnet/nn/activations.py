"""Activations, usable both as functions (``relu(x)``) and as layers (``serial(..., relu)``).

Each is a thin wrapper over ``jax.nn``; ``softmax`` and ``log_softmax`` act on the
last axis.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax

from jaxnet.nn.layer import Layer, require_feature_axis


@dataclasses.dataclass(frozen=True, repr=False)
class Activation(Layer):
    """An elementwise (or last-axis) function as a layer without parameters.

    Args:
      fn: ``(..., features) -> (..., features)``, e.g. ``jax.nn.relu``.
      name: the name used in params paths and summaries; defaults to ``fn.__name__``.

    Example:
      >>> swish = Activation(jax.nn.swish)   # then serial(Dense(8), swish)
    """

    fn: Callable[[jax.Array], jax.Array]
    name: str | None = None
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Activation: fn must be callable, got {self.fn!r}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.name or getattr(self.fn, "__name__", "activation")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)

    def __repr__(self) -> str:
        return self.kind

    def init_params(self, key, x):
        # Requiring a feature axis keeps the example rank inferred for a network without params
        # above 0: otherwise softmax.apply({}, x) would see a (batch, classes) x flattened into
        # one axis and normalise over the whole batch.
        require_feature_axis(x)
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        return self.fn(x), state


def _at_least_float32(fn):
    """``fn`` computed in float32 for bfloat16/float16 inputs, the result in the input's dtype:
    a softmax's exponentials and normalisation would otherwise round several times."""
    def wrapped(x):
        x = jax.numpy.asarray(x)
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating) or jax.numpy.finfo(x.dtype).bits >= 32:
            return fn(x)
        return fn(x.astype(jax.numpy.float32)).astype(x.dtype)
    wrapped.__name__ = fn.__name__
    return wrapped


sigmoid = Activation(jax.nn.sigmoid, "sigmoid")
relu = Activation(jax.nn.relu, "relu")
tanh = Activation(jax.numpy.tanh, "tanh")
gelu = Activation(jax.nn.gelu, "gelu")
silu = Activation(jax.nn.silu, "silu")
elu = Activation(jax.nn.elu, "elu")
leaky_relu = Activation(jax.nn.leaky_relu, "leaky_relu")
softplus = Activation(jax.nn.softplus, "softplus")
softmax = Activation(_at_least_float32(jax.nn.softmax), "softmax")
log_softmax = Activation(_at_least_float32(jax.nn.log_softmax), "log_softmax")

ACTIVATIONS = {a.kind: a for a in (sigmoid, relu, tanh, gelu, silu, elu, leaky_relu, softplus,
                                   softmax, log_softmax)}
