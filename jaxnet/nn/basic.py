"""Dense, Embedding, Flatten, Reshape and Dropout layers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxnet._xla import dense_ops
from jaxnet.nn.layer import (Layer, ShapeError, broadcast_trailing, param_dtype, require_feature_axis,
                             require_floating, require_key, shape_str, trace_options)
from jaxnet.nn.initializers import check_weight_init, init_weight_and_bias
from jaxnet.validate import positive_int, probability


check_positive = positive_int  # the name the layer modules use


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., in) @ w (in, out) -> (..., out)`` in ``x``'s dtype, as the traced call asks.

    The layers' one way to a matrix product (``Dense``, attention, recurrent layers, a tied
    output projection): on operands rounded to ``trace_options().matmul_dtype`` and accumulated
    in float32 when it is set (the ``"bf16"`` precision policy), and with ``reverse_only`` through
    ``dense_ops.matmul``, whose custom VJP computes the weight gradient in the orientation
    XLA:CPU runs fast and rounds the gradient products' operands too.
    """
    options = trace_options()
    if options.reverse_only:
        return dense_ops.matmul(x, w, options.matmul_dtype)
    return dense_ops.product(x, w, options.matmul_dtype)


def matmul_transposed(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., in) @ w.T`` for ``w (out, in)``: :func:`matmul` of a transposed weight (a tied
    embedding table), with ``reverse_only`` through ``dense_ops.matmul_transposed``, whose
    gradients XLA:CPU runs in bfloat16 under the ``"bf16"`` policy."""
    options = trace_options()
    if options.reverse_only:
        return dense_ops.matmul_transposed(x, w, options.matmul_dtype)
    return dense_ops.product(x, w.T, options.matmul_dtype)


@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Layer):
    """``y = x @ w + b`` on the last axis.

    Args:
      features: output width.
      use_bias: add the bias ``b``.
      weight_init: ``"lecun_normal"`` (default), ``"he_normal"``, ``"he_uniform"``,
        ``"glorot_normal"``, ``"glorot_uniform"``, ``"lecun_uniform"``, ``"pytorch"``
        or a ``jax.nn.initializers`` function.

    Under the ``"bf16"`` precision policy the product runs on bfloat16 operands with float32
    accumulation, forward and backward (:func:`matmul`).

    Shapes:
      x: ``(batch, ..., in_features)`` floating; params ``w: (in_features, features)``,
      ``b: (features,)`` in x's dtype; y: ``(batch, ..., features)``.
    """

    features: int
    use_bias: bool = True
    weight_init: Any = "lecun_normal"
    kind: ClassVar[str] = "dense"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("Dense", "features", self.features)
        check_weight_init("Dense", self.weight_init)

    def init_params(self, key, x):
        require_floating(x)
        require_feature_axis(x)
        return init_weight_and_bias(key, self.weight_init, (x.shape[-1], self.features),
                                    x.shape[-1], self.use_bias, x.dtype), {}

    def forward(self, params, state, x, *, train, key):
        y = matmul(x, params["w"])
        if self.use_bias:
            y = y + broadcast_trailing(params["b"], y)
        return y, state

    def flops(self, x_shape, y_shape, params):
        return 2 * math.prod(x_shape) * self.features + (math.prod(y_shape) if self.use_bias else 0)


@dataclasses.dataclass(frozen=True, repr=False)
class Embedding(Layer):
    """A lookup table: integer ids to vectors.

    Args:
      num_embeddings: number of ids; valid ids are ``0 .. num_embeddings - 1``.
      features: vector width.

    Shapes:
      x: ``(batch, ...)`` integer ids; params ``table: (num_embeddings, features)``
      float32; y: ``(batch, ..., features)``. An id out of range gives a row of NaN,
      never another id's vector.
    """

    num_embeddings: int
    features: int
    kind: ClassVar[str] = "embedding"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("Embedding", "num_embeddings", self.num_embeddings)
        check_positive("Embedding", "features", self.features)

    def init_params(self, key, x):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"expected integer ids, got {x.dtype} of shape {shape_str(x.shape)}")
        table = jax.random.normal(key, (self.num_embeddings, self.features), param_dtype(x))
        return {"table": table}, {}

    def forward(self, params, state, x, *, train, key):
        # jnp.take wraps negative ids (-1 is the last row) even with mode="fill"; an id is valid
        # only in 0 .. num_embeddings - 1, so negatives must fill with NaN like the others.
        table = jnp.asarray(params["table"])
        return table.at[x].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False), state

    def flops(self, x_shape, y_shape, params):
        return 0


@dataclasses.dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """Flattens each example into a vector: ``(batch, *example) -> (batch, prod(example))``."""

    kind: ClassVar[str] = "flatten"

    def forward(self, params, state, x, *, train, key):
        return x.reshape(x.shape[0], -1), state

    def flops(self, x_shape, y_shape, params):
        return 0


@dataclasses.dataclass(frozen=True, repr=False)
class Reshape(Layer):
    """Reshapes each example: ``(batch, *example) -> (batch, *shape)``.

    Args:
      shape: the new example shape; at most one entry may be ``-1``.
    """

    shape: tuple[int, ...]
    kind: ClassVar[str] = "reshape"

    def __post_init__(self):
        if not isinstance(self.shape, (tuple, list)):
            raise TypeError(f"Reshape: shape must be a tuple of sizes such as (28, 28) or (-1,), "
                            f"got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(self.shape))
        if (any(not isinstance(d, int) or d == 0 or d < -1 for d in self.shape)
                or self.shape.count(-1) > 1):
            raise ValueError(f"Reshape: shape must hold positive sizes and at most one -1, got {self.shape}")

    def _target(self, example_shape):
        size, known = math.prod(example_shape), math.prod(d for d in self.shape if d != -1)
        target = tuple(size // known if d == -1 else d for d in self.shape)
        if math.prod(target) != size:
            raise ShapeError(f"cannot reshape examples of shape {shape_str(example_shape)} "
                             f"({size} values) to {shape_str(self.shape)}")
        return target

    def init_params(self, key, x):
        self._target(x.shape[1:])
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        return x.reshape((x.shape[0],) + self._target(x.shape[1:])), state

    def flops(self, x_shape, y_shape, params):
        return 0


@dataclasses.dataclass(frozen=True, repr=False)
class Dropout(Layer):
    """Zeroes each value with probability ``drop_rate`` in training mode, scaling the rest by ``1/(1-drop_rate)``.

    Identity in evaluation mode. In training mode it needs a PRNG key
    (``apply(..., key=k, train=True)``).

    Args:
      drop_rate: probability of dropping a value, in ``[0, 1)``.
    """

    drop_rate: float
    kind: ClassVar[str] = "dropout"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        probability("Dropout", "drop_rate", self.drop_rate)

    @property
    def needs_key(self):
        return self.drop_rate > 0

    def forward(self, params, state, x, *, train, key):
        if not train or self.drop_rate == 0:
            return x, state
        require_key(key, "Dropout")
        # apply_with_state(..., drop_rate=r) replaces the rate with a (traced) value.
        override = trace_options().drop_rate
        keep_rate = 1.0 - (self.drop_rate if override is None else override)
        keep = jax.random.bernoulli(key, keep_rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(keep_rate, x.dtype), jnp.zeros_like(x)), state
